//! sluice-engine: the core of Sluice.
//!
//! It owns the shapes every other crate builds on — batches and their metadata columns
//! ([`batch`]), the [`stage::Stage`], [`source::Source`] and [`sink::Sink`] traits, the
//! configuration mechanism ([`config`]) — and the [`executor`] that runs a pipeline. It holds
//! no connector or function code: those live in `sluice-connectors` and `sluice-udfs`, and
//! reach the engine only through these traits.

pub mod autoscale;
pub mod batch;
pub mod breaker;
pub mod busy;
pub mod checkpoint;
pub mod config;
pub mod connector;
pub mod dead_letter;
pub mod error;
pub mod executor;
pub mod failure;
pub mod graph;
pub mod http_body;
pub mod json_limits;
pub mod sink;
pub mod source;
pub mod stage;
pub mod state;
pub mod stats;
pub mod tap;

pub use error::{Error, ErrorClass, Result};
