//! `source:`: the fields every source has, and each kind's.

use super::*;

pub(super) const SOURCE_COMMON: &[&str] = &["type", "batch_size", "batch_window"];

/// Fields every source has.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SourceCommon {
    #[serde(rename = "type")]
    pub(super) _type: String,
    /// The most records in one batch (default 8192).
    #[serde(default = "default_batch_size")]
    pub(super) batch_size: usize,
    /// The longest a batch waits to fill up after its first record (default 100ms).
    #[serde(default = "default_batch_window")]
    pub(super) batch_window: Duration,
}

pub(super) fn default_batch_size() -> usize {
    8192
}
pub(super) fn default_batch_window() -> Duration {
    Duration::from_millis(100)
}

/// `source: kafka` picks the entry `kafka` of the map `sources:` (likewise `sink:` and
/// `dead_letter:` of `sinks:`), so that one pipeline file runs on files or a generator
/// locally and on Kafka in production: `source: ${SOURCE:-generator}`.
pub(super) fn pick<'a>(
    root: &'a Node,
    node: &'a Node,
    key: &str,
    alternatives: &str,
    problems: &mut Problems,
) -> Option<(&'a Node, Location)> {
    let Some(name) = node.scalar() else {
        return Some((node, Location::new(key)));
    };
    let choices = root.get(alternatives);
    match choices.and_then(|c| c.get(name)) {
        Some(chosen) => Some((chosen, Location::new(alternatives).key(name))),
        None => {
            let names: Vec<String> = match choices.map(|c| &c.value) {
                Some(Value::Map(entries)) => entries
                    .iter()
                    .filter_map(|(k, _)| k.scalar().map(|k| format!("`{k}`")))
                    .collect(),
                _ => Vec::new(),
            };
            let message = if names.is_empty() {
                format!(
                    "`{key}: {name}` names an entry of `{alternatives}:`, but there is no `{alternatives}:` map; write the {key} here as a map with a `type`"
                )
            } else {
                format!(
                    "`{name}` is not one of the `{alternatives}:` entries ({})",
                    names.join(", ")
                )
            };
            problems.at(&Location::new(key), node, message);
            None
        }
    }
}

pub(super) fn parse_source(
    node: &Node,
    path: Location,
    problems: &mut Problems,
) -> Option<SourceConfig> {
    let (entry, node) = split_kind_in(node, &path, registry::SOURCES, problems)?;
    let common = select_keys(node, SOURCE_COMMON, true);
    let rest = select_keys(node, SOURCE_COMMON, false);
    let common: Option<SourceCommon> = from_node(&common, &path, &[], problems);
    let spec = (entry.parse)(&rest, node, &path, SOURCE_COMMON, problems);
    let common = common?;
    if common.batch_size == 0 {
        problems.at_key(node, &path, "batch_size", "must be at least 1");
    }
    Some(SourceConfig {
        batching: Batching {
            size: common.batch_size,
            window: common.batch_window.get(),
        },
        kind: entry.name,
        spec: spec?,
        at: At {
            node: node.clone(),
            path,
        },
    })
}
