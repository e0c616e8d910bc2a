//! `nexmark`: the events of the Nexmark streaming benchmark (people, auctions and bids of an
//! online auction house), made the way the reference generators (nexmark/nexmark for
//! Flink, Apache Beam) make them, straight into Arrow arrays.

mod config;
mod model;
mod source;

pub use config::NexmarkConfig;
pub use source::{NexmarkPartition, NexmarkSource, record_schema};
