//! Pipeline configuration: the mechanism that turns YAML text into typed structs and every
//! mistake in it into a [`Problem`] that names the YAML path, the line and column, and what
//! was expected.
//!
//! # How a file is read
//! 1. [`yaml::parse`] builds a [`Node`] tree that remembers every value's location and
//!    substitutes `${VAR}` / `${VAR:-default}`.
//! 2. Each component (the source, every stage, the sink, …) is deserialized on its own with
//!    [`de::from_node`], a serde deserializer over that tree. Unknown fields are reported and
//!    skipped, so one typo does not hide the next; a component whose values do not fit is
//!    reported and left out, and the others are still read.
//! 3. Pure validation (names unique, numbers in range, …) adds to the same [`Problems`].
//!
//! Only when [`Problems`] is empty does anything open a file or plan a query.
//!
//! Components are closed sets of kinds chosen by a `type` key. The choice is made here on the
//! tree (see [`split_kind`]) rather than with `#[serde(tag = "type")]`: serde buffers tagged
//! enums into its private `Content` type, which would lose every location below the tag.

pub mod de;
pub mod schema;
pub mod types;
pub mod yaml;

use std::fmt;

pub use de::from_node;
pub use types::{ByteSize, Duration};
pub use yaml::{Mark, Node, Value};

/// A YAML path such as `stages[1].batch_size`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location(String);

impl Location {
    pub fn root() -> Self {
        Location(String::new())
    }

    pub fn new(path: impl Into<String>) -> Self {
        Location(path.into())
    }

    pub fn key(&self, key: &str) -> Self {
        if self.0.is_empty() {
            Location(key.to_string())
        } else {
            Location(format!("{}.{key}", self.0))
        }
    }

    pub fn index(&self, i: usize) -> Self {
        Location(format!("{}[{i}]", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One thing wrong with a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: Location,
    pub mark: Option<Mark>,
    pub message: String,
}

/// Every problem found in one file, in the order of the file.
#[derive(Debug, Clone, Default)]
pub struct Problems {
    file: String,
    list: Vec<Problem>,
}

impl Problems {
    pub fn new(file: impl Into<String>) -> Self {
        Problems {
            file: file.into(),
            list: Vec::new(),
        }
    }

    pub fn push(&mut self, problem: Problem) {
        self.list.push(problem);
    }

    pub fn push_at(&mut self, path: Location, mark: Mark, message: String) {
        self.list.push(Problem {
            path,
            mark: Some(mark),
            message,
        });
    }

    /// A problem about `node` at `path`.
    pub fn at(&mut self, path: &Location, node: &Node, message: impl Into<String>) {
        self.push_at(path.clone(), node.mark, message.into());
    }

    /// A problem with the value of `key` in the mapping `node` (at `path`); points at the
    /// value when it is there, at the mapping when it is not.
    pub fn at_key(&mut self, node: &Node, path: &Location, key: &str, message: impl Into<String>) {
        let mark = node.get(key).map_or(node.mark, |v| v.mark);
        self.push_at(path.key(key), mark, message.into());
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.list.iter()
    }

    /// Problems sorted by where they are in the file.
    pub fn sorted(mut self) -> Self {
        self.list
            .sort_by_key(|p| p.mark.map(|m| (m.line, m.column)).unwrap_or((0, 0)));
        self
    }

    pub fn into_result<T>(self, value: T) -> Result<T, Problems> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.sorted())
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if !p.path.as_str().is_empty() {
                write!(f, "{}: ", p.path)?;
            }
            write!(f, "{}", p.message)?;
            match p.mark {
                Some(m) => write!(f, " ({}:{}:{})", self.file, m.line, m.column)?,
                None => write!(f, " ({})", self.file)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Whether `name` may name a stage, an output or a route's branch: letters, digits, `_`
/// and `-` (a `.` joins a route and its branch, `route.branch`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Reads a mapping that must hold only `known` keys, reporting every other key.
pub fn check_keys(node: &Node, path: &Location, known: &[&str], problems: &mut Problems) -> bool {
    let Value::Map(entries) = &node.value else {
        problems.at(
            path,
            node,
            format!("expected a mapping, found {}", node.describe()),
        );
        return false;
    };
    for (k, _) in entries {
        let key = k.scalar().unwrap_or_default();
        if !known.contains(&key) {
            problems.at(
                &path.key(key),
                k,
                format!("unknown field, expected one of {}", known.join(", ")),
            );
        }
    }
    true
}

/// Splits a component mapping on its `type` key: returns the kind and the mapping without
/// the common keys, which the caller reads with their own struct. `kinds` lists the valid
/// kinds for the error message.
pub fn split_kind<'a>(
    node: &'a Node,
    path: &Location,
    kinds: &[&str],
    problems: &mut Problems,
) -> Option<(&'a str, &'a Node)> {
    let Value::Map(_) = &node.value else {
        problems.at(
            path,
            node,
            format!(
                "expected a mapping with a `type` ({}), found {}",
                kinds.join(", "),
                node.describe()
            ),
        );
        return None;
    };
    let Some(kind) = node.get("type") else {
        problems.at(
            path,
            node,
            format!("missing field `type`, expected one of {}", kinds.join(", ")),
        );
        return None;
    };
    match kind.scalar() {
        Some(k) if kinds.contains(&k) => Some((k, node)),
        _ => {
            problems.at(
                &path.key("type"),
                kind,
                format!(
                    "unknown type {}, expected one of {}",
                    kind.describe(),
                    kinds.join(", ")
                ),
            );
            None
        }
    }
}

/// A copy of a mapping with only (or without) some keys, keeping every location.
pub fn select_keys(node: &Node, keys: &[&str], keep: bool) -> Node {
    let entries = match &node.value {
        Value::Map(entries) => entries
            .iter()
            .filter(|(k, _)| keys.contains(&k.scalar().unwrap_or_default()) == keep)
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    Node {
        mark: node.mark,
        value: Value::Map(entries),
    }
}
