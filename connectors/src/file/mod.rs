//! `file`: JSON lines, CSV and Parquet files as a source; JSON lines and Parquet as a sink.

mod config;
#[cfg(test)]
pub(crate) mod hostile;
mod sink;
mod source;

pub use config::{FileFormat, FileSinkConfig, FileSourceConfig};
pub use sink::FileSink;
pub use source::FileSource;
