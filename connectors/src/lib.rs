//! sluice-connectors: where records come from and where they go.
//!
//! One folder per system, each with `config.rs` (the YAML struct, whose doc comments are
//! the user documentation), `source.rs` and/or `sink.rs`. The engine knows them only through
//! `sluice_engine::source::Source` and `sluice_engine::sink::Sink`.

pub mod avro;
pub mod debezium;
pub mod file;
pub mod format;
pub mod generator;
pub mod json;
pub mod kafka;
pub mod kinesis;
mod made;
pub mod nexmark;
pub mod null;
pub mod protobuf;
pub mod registry;
pub mod stdout;
pub mod stream;
