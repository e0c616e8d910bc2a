//! `sink:` and `dead_letter:`: the fields every sink has, and each kind's.

use super::*;

pub(super) const SINK_COMMON: &[&str] = &["type", "metadata_columns", "input", "inputs"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SinkCommon {
    #[serde(rename = "type")]
    pub(super) _type: String,
    /// Metadata columns to write along with the record columns (default none).
    #[serde(default)]
    pub(super) metadata_columns: Vec<String>,
    /// What it writes (read with their locations by `graph::parse_reads`).
    #[serde(default, rename = "input")]
    pub(super) _input: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "inputs")]
    pub(super) _inputs: Option<serde::de::IgnoredAny>,
}

/// Reads a sink named `name` (`sink`, or its `sinks:` entry's name).
pub(super) fn parse_sink(
    node: &Node,
    path: &Location,
    name: &str,
    problems: &mut Problems,
) -> Option<SinkConfig> {
    let (entry, node) = split_kind_in(node, path, registry::SINKS, problems)?;
    let reads = graph::parse_reads(node, path, problems);
    let common = select_keys(node, SINK_COMMON, true);
    let rest = select_keys(node, SINK_COMMON, false);
    let common: Option<SinkCommon> = from_node(&common, path, &[], problems);
    let spec = (entry.parse)(&rest, node, path, SINK_COMMON, problems);
    let common = common?;
    for name in &common.metadata_columns {
        if !batch::is_metadata(name) {
            problems.at_key(
                node,
                path,
                "metadata_columns",
                format!(
                    "`{name}` is not a metadata column, expected some of {}",
                    batch::ALL_METADATA_COLUMNS.join(", ")
                ),
            );
        }
    }
    Some(SinkConfig {
        name: name.to_string(),
        reads,
        inputs: Vec::new(),
        kind: entry.name,
        spec: spec?,
        metadata_columns: common.metadata_columns,
        at: At {
            node: node.clone(),
            path: path.clone(),
        },
    })
}
