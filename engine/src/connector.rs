//! How the pipeline file meets the connectors and stages: a source, sink or stage kind is
//! a configuration type that checks itself and opens (or plans) what it describes,
//! registered by name in a table (`sluice_connectors::registry` for sources and sinks,
//! `sluice_udfs::registry` for stages, as functions are in `sluice_udfs::functions`).
//!
//! The `sluice` binary reads `source: { type: kafka, ... }` by looking `kafka` up in the
//! table, deserializing the kind's own keys into its type (problems placed at their
//! line:column), calling [`SourceSpec::check`] for what types cannot say, and later
//! [`SourceSpec::open`]. A new connector is a folder in `connectors/src` with a
//! configuration type implementing [`SourceSpec`] or [`SinkSpec`], and one line in the
//! table; nothing in the binary names it.

use std::any::Any;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::Result;
use crate::config::{Location, Node, Problems, from_node, split_kind};
use crate::dead_letter::{DeadLetterSink, text_schema};
use crate::sink::Sink;
use crate::source::Source;
use crate::stage::StageFactory;

/// What `sluice validate` finds when it asks the outside systems a source or sink names
/// (a schema registry): problems at the component's keys, and notes (a system it could not
/// reach: not a problem, the file may be right).
#[derive(Debug, Default)]
pub struct RemoteCheck {
    pub problems: Vec<(&'static str, String)>,
    pub notes: Vec<String>,
}

/// A source kind as written in the pipeline file.
#[async_trait]
pub trait SourceSpec: Any + Send + Sync {
    /// Checks what the types cannot (pure, no I/O), placing problems at the keys of `node`,
    /// the source's mapping at `path`.
    fn check(&self, _node: &Node, _path: &Location, _problems: &mut Problems) {}

    /// The records' schema, metadata columns included, when it is known without reading
    /// data (declared, or fixed by the kind): `sluice test` needs no data then.
    fn declared_schema(&self) -> Option<SchemaRef>;

    /// Opens the source. `batch_size`: the most records in a batch; with `dead_letters`,
    /// records that do not decode become dead letters instead of stopping the run.
    fn open(&self, batch_size: usize, dead_letters: bool) -> Result<Box<dyn Source>>;

    /// The key of the source's mapping a failure to open it is shown at.
    fn open_error_key(&self) -> &'static str {
        "type"
    }

    /// Checks what only an outside system can say (for `sluice validate`, never for a
    /// run): a declared schema against the registry's latest version.
    async fn check_remote(&self) -> RemoteCheck {
        RemoteCheck::default()
    }

    /// Where the source measures a partition's lag in time rather than in records, what
    /// that lag is, for people (`a Kinesis source's lag is in time (…)`): the autoscaler's
    /// `lag_threshold` is then a time.
    fn lag_in_time(&self) -> Option<&'static str> {
        None
    }
}

/// A sink kind as written in the pipeline file.
pub trait SinkSpec: Any + Send + Sync {
    /// As [`SourceSpec::check`].
    fn check(&self, _node: &Node, _path: &Location, _problems: &mut Problems) {}

    /// Opens the sink for batches of `input`.
    fn open(&self, input: &Schema) -> Result<Box<dyn Sink>>;

    /// Opens it as the dead-letter sink. By default the sink written with dead letters as
    /// rows of text ([`text_schema`]); a sink that keeps records' bytes (Kafka) says so.
    fn open_dead_letter(&self) -> Result<DeadLetterSink> {
        Ok(DeadLetterSink {
            sink: self.open(&text_schema())?,
            text: true,
        })
    }

    /// The same sink for another writer beside the pipeline (a worker process, a dead-letter
    /// replay), with its outputs named apart by `part` where two writers' outputs could
    /// clash (a file sink's prefix becomes `{prefix}-{part}`); `None` when they cannot.
    fn named_apart(&self, _part: &str) -> Option<Arc<dyn SinkSpec>> {
        None
    }

    /// The key of the sink's mapping a failure to open it is shown at.
    fn open_error_key(&self) -> &'static str {
        "path"
    }
}

/// Reads a kind's own keys (`fields`: the mapping without the keys every kind has, named
/// in `common`) into `T`, then lets it check itself against the whole mapping `node`.
pub type Parse<S> = fn(
    fields: &Node,
    node: &Node,
    path: &Location,
    common: &[&str],
    problems: &mut Problems,
) -> Option<Arc<S>>;

/// A stage kind as written in the pipeline file (`type: sql`, `function`, `aggregate`).
#[async_trait]
pub trait StageSpec: Any + Send + Sync {
    /// The key of the stage's mapping a planning problem is shown at (`query`, `params`).
    fn main_key(&self) -> &'static str;

    /// Plans the stage named `name` against the schema of its input; the error is a
    /// sentence for the user ([`crate::Error::Plan`]).
    async fn plan(&self, name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>>;
}

/// A registered stage kind; its `parse` reads the stage's own keys (those every stage has
/// are named in `common`).
pub struct StageEntry {
    pub name: &'static str,
    pub summary: &'static str,
    pub parse: Parse<dyn StageSpec>,
}

/// A registered source kind.
pub struct SourceEntry {
    /// The `type:` that names it.
    pub name: &'static str,
    /// One line for error messages and documentation.
    pub summary: &'static str,
    pub parse: Parse<dyn SourceSpec>,
}

/// A registered sink kind.
pub struct SinkEntry {
    pub name: &'static str,
    pub summary: &'static str,
    pub parse: Parse<dyn SinkSpec>,
}

/// An entry of a table of kinds, named by the `type:` that picks it.
pub trait Registered: Sync + 'static {
    fn name(&self) -> &'static str;
}

impl Registered for SourceEntry {
    fn name(&self) -> &'static str {
        self.name
    }
}

impl Registered for SinkEntry {
    fn name(&self) -> &'static str {
        self.name
    }
}

impl Registered for StageEntry {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// The entry of `table` that `node`'s `type:` names, and the mapping (an unknown or
/// missing `type` is a problem placed as [`split_kind`] places it, listing the table).
pub fn split_kind_in<'a, E: Registered>(
    node: &'a Node,
    path: &Location,
    table: &'static [E],
    problems: &mut Problems,
) -> Option<(&'static E, &'a Node)> {
    let names: Vec<&str> = table.iter().map(Registered::name).collect();
    let (kind, node) = split_kind(node, path, &names, problems)?;
    let entry = table
        .iter()
        .find(|e| e.name() == kind)
        .expect("split_kind checked the kind");
    Some((entry, node))
}

/// [`SourceEntry::parse`] for a configuration type.
pub fn parse_source<T: SourceSpec + DeserializeOwned>(
    fields: &Node,
    node: &Node,
    path: &Location,
    common: &[&str],
    problems: &mut Problems,
) -> Option<Arc<dyn SourceSpec>> {
    let spec: T = from_node(fields, path, common, problems)?;
    spec.check(node, path, problems);
    Some(Arc::new(spec))
}

/// [`SinkEntry::parse`] for a configuration type.
pub fn parse_sink<T: SinkSpec + DeserializeOwned>(
    fields: &Node,
    node: &Node,
    path: &Location,
    common: &[&str],
    problems: &mut Problems,
) -> Option<Arc<dyn SinkSpec>> {
    let spec: T = from_node(fields, path, common, problems)?;
    spec.check(node, path, problems);
    Some(Arc::new(spec))
}

/// The configuration behind a spec, for the few places that do something only one kind
/// can (a consumer group's supervisor, reading dead letters back).
pub fn downcast_source<T: SourceSpec>(spec: &dyn SourceSpec) -> Option<&T> {
    (spec as &dyn Any).downcast_ref()
}

/// As [`downcast_source`], for sinks.
pub fn downcast_sink<T: SinkSpec>(spec: &dyn SinkSpec) -> Option<&T> {
    (spec as &dyn Any).downcast_ref()
}
