use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_engine::config::schema::SchemaSpec;
use sluice_engine::config::{ByteSize, Duration, Location, Node, Problems};

/// How records are stored in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values (source only).
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl FileFormat {
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "jsonl" | "ndjson" | "json" => Some(FileFormat::Jsonl),
            "csv" => Some(FileFormat::Csv),
            "parquet" => Some(FileFormat::Parquet),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Jsonl => "jsonl",
            FileFormat::Csv => "csv",
            FileFormat::Parquet => "parquet",
        }
    }
}

/// Reads records from a file, or from every file of a directory (one partition per file,
/// in name order).
///
/// ```yaml
/// source:
///   type: file
///   path: data/uploads/
///   format: jsonl
///   schema:
///     - { name: title_id, type: int64, nullable: false }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// A file, or a directory whose files are each read as a partition.
    pub path: PathBuf,
    /// jsonl, csv or parquet. Default: from the file extension.
    pub format: Option<FileFormat>,
    /// The records' fields. Required for jsonl and csv unless `infer_schema` is true;
    /// Parquet files carry their own schema, and a declared one selects and casts columns.
    pub schema: Option<SchemaSpec>,
    /// Infer the schema from the first 1000 records of the first file (jsonl, csv).
    #[serde(default)]
    pub infer_schema: bool,
    /// csv: whether the first line names the columns (default true).
    #[serde(default = "yes")]
    pub header: bool,
    /// csv: the field separator (default `,`).
    #[serde(default = "comma")]
    pub delimiter: char,
    /// The largest record accepted (jsonl, csv); a longer one is a bad record, never an
    /// out-of-memory (default 16MiB).
    #[serde(default = "default_max_record")]
    pub max_record_size: ByteSize,
}

fn yes() -> bool {
    true
}
fn comma() -> char {
    ','
}
fn default_max_record() -> ByteSize {
    ByteSize(16 << 20)
}

impl FileSourceConfig {
    /// The format: declared, or read from the path's extension.
    pub fn resolved_format(&self) -> Option<FileFormat> {
        self.format.or_else(|| FileFormat::from_path(&self.path))
    }
}

/// Writes batches to files in a directory, rolled by size or age. Each file is written under
/// a hidden temporary name and renamed when complete, so no reader sees half a file.
///
/// ```yaml
/// sink:
///   type: file
///   path: out/views
///   format: parquet
///   max_file_size: 64MiB
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The directory to write to; created when missing.
    pub path: PathBuf,
    /// jsonl or parquet (default jsonl).
    #[serde(default = "default_sink_format")]
    pub format: FileFormat,
    /// Start a new file once the current one holds this much (default 128MiB).
    #[serde(default = "default_max_file_size")]
    pub max_file_size: ByteSize,
    /// Start a new file once the current one has been open this long (default: no limit).
    pub max_file_age: Option<Duration>,
    /// File names are `{prefix}-{sequence}.{format}` (default `part`); a `sluice worker`
    /// writes `{prefix}-{member}-{sequence}.{format}`, so members share a directory.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_sink_format() -> FileFormat {
    FileFormat::Jsonl
}
fn default_max_file_size() -> ByteSize {
    ByteSize(128 << 20)
}
fn default_prefix() -> String {
    "part".to_string()
}

mod spec {
    use super::*;
    use std::sync::Arc;

    use arrow::datatypes::{Schema, SchemaRef};
    use sluice_engine::Result;
    use sluice_engine::connector::{SinkSpec, SourceSpec};
    use sluice_engine::sink::Sink;
    use sluice_engine::source::Source;

    use crate::file::{FileSink, FileSource};

    impl SourceSpec for FileSourceConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            let format = self.resolved_format();
            if format.is_none() && !self.path.is_dir() {
                problems.at_key(
                node,
                path,
                "format",
                format!(
                    "cannot tell the format of `{}` from its extension: set format to jsonl, csv or parquet",
                    self.path.display()
                ),
            );
            }
            // A directory without `format` is checked once its files are listed.
            let text = matches!(format, Some(FileFormat::Jsonl | FileFormat::Csv))
                || (format.is_none() && !self.path.is_dir());
            if text && self.schema.is_none() && !self.infer_schema {
                problems.at_key(
                node,
                path,
                "schema",
                "a jsonl or csv source needs a `schema`, or `infer_schema: true` to infer one from the data",
            );
            }
            if self.schema.is_some() && self.infer_schema {
                problems.at_key(
                    node,
                    path,
                    "infer_schema",
                    "give either `schema` or `infer_schema: true`, not both",
                );
            }
            if format == Some(FileFormat::Parquet) && self.infer_schema {
                problems.at_key(
                    node,
                    path,
                    "infer_schema",
                    "Parquet files carry their schema; infer_schema applies to jsonl and csv",
                );
            }
            if !self.delimiter.is_ascii() {
                problems.at_key(
                    node,
                    path,
                    "delimiter",
                    "the delimiter must be one ASCII character",
                );
            }
        }

        fn declared_schema(&self) -> Option<SchemaRef> {
            let records = self.schema.as_ref()?.to_arrow();
            sluice_engine::batch::with_metadata(&records).ok()
        }

        fn open(&self, batch_size: usize, dead_letters: bool) -> Result<Box<dyn Source>> {
            let source = FileSource::open(self.clone(), batch_size)?;
            Ok(Box::new(source.with_dead_letters(dead_letters)))
        }

        fn open_error_key(&self) -> &'static str {
            "path"
        }
    }

    impl SinkSpec for FileSinkConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            if self.format == FileFormat::Csv {
                problems.at_key(
                    node,
                    path,
                    "format",
                    "the file sink writes jsonl or parquet",
                );
            }
            if self.max_file_size.0 == 0 {
                problems.at_key(node, path, "max_file_size", "must be more than 0 bytes");
            }
            if self.prefix.is_empty()
                || self.prefix.contains(['/', '\\'])
                || self.prefix.starts_with('.')
            {
                problems.at_key(
                    node,
                    path,
                    "prefix",
                    "must be a plain file name start, without slashes or a leading dot",
                );
            }
        }

        fn open(&self, _input: &Schema) -> Result<Box<dyn Sink>> {
            Ok(Box::new(FileSink::open(self.clone())?))
        }

        fn named_apart(&self, part: &str) -> Option<Arc<dyn SinkSpec>> {
            let mut config = self.clone();
            config.prefix = format!("{}-{part}", config.prefix);
            Some(Arc::new(config))
        }
    }
}
