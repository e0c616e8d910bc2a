//! Lookup tables loaded from a file (Parquet, CSV or JSON lines), shared by every worker and
//! loaded again when the file changes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches, interleave};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use serde::Deserialize;
use sluice_engine::config::Duration;
use sluice_engine::config::schema::SchemaSpec;
use sluice_engine::{Error, Result, plan_err};

use super::{KeyText, key_at, keys_as_text};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLookup {
    /// A `.parquet`, `.csv` or `.jsonl`/`.json` file.
    path: PathBuf,
    /// The key column in the file (default: the stage's `key`).
    key: Option<String>,
    /// How often the file's modification time is checked.
    #[serde(default = "default_reload_every")]
    reload_every: Duration,
}

fn default_reload_every() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}

/// The table as last loaded.
pub struct Loaded {
    /// The file's [`version`] when it was read.
    version: Option<(SystemTime, u64)>,
    values: RecordBatch,
    index: Index,
}

enum Index {
    Int(HashMap<i64, u32>),
    Text(HashMap<Box<str>, u32>),
}

pub struct FileTable {
    path: PathBuf,
    key: String,
    columns: Option<SchemaSpec>,
    reload_every: std::time::Duration,
    values_schema: SchemaRef,
    current: RwLock<Arc<Loaded>>,
    last_check: Mutex<Instant>,
}

impl FileTable {
    /// Loads the table (at planning: a missing or unreadable file is a plan error).
    pub fn load(
        lookup: &FileLookup,
        stage_key: &str,
        columns: Option<&SchemaSpec>,
    ) -> Result<Self> {
        let key = lookup.key.clone().unwrap_or_else(|| stage_key.to_string());
        let loaded = read_table(&lookup.path, &key, columns)?;
        Ok(FileTable {
            path: lookup.path.clone(),
            key,
            columns: columns.cloned(),
            reload_every: lookup.reload_every.get(),
            values_schema: loaded.values.schema(),
            current: RwLock::new(Arc::new(loaded)),
            last_check: Mutex::new(Instant::now()),
        })
    }

    pub fn values_schema(&self) -> SchemaRef {
        self.values_schema.clone()
    }

    pub fn describe(&self) -> String {
        format!("{}", self.path.display())
    }

    /// The current table, loaded again first if the file changed since it was read.
    pub async fn current(&self) -> Result<Arc<Loaded>> {
        let table = self.current.read().expect("table lock").clone();
        let due = match self.last_check.try_lock() {
            Ok(mut last) if last.elapsed() >= self.reload_every => {
                *last = Instant::now();
                true
            }
            _ => false,
        };
        if !due || version(&self.path) == table.version {
            return Ok(table);
        }
        let (path, key, columns) = (self.path.clone(), self.key.clone(), self.columns.clone());
        let reloaded =
            tokio::task::spawn_blocking(move || read_table(&path, &key, columns.as_ref()))
                .await
                .map_err(|e| Error::task("lookup-table reload", e))?;
        match reloaded {
            Ok(new) if new.values.schema() == self.values_schema => {
                tracing::info!(file = %self.path.display(), rows = new.values.num_rows(), "lookup table reloaded");
                let new = Arc::new(new);
                *self.current.write().expect("table lock") = new.clone();
                Ok(new)
            }
            Ok(_) => {
                tracing::warn!(file = %self.path.display(), "lookup table not reloaded: its columns changed; keeping the old one");
                Ok(table)
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "lookup table not reloaded, keeping the old one: {e}");
                Ok(table)
            }
        }
    }
}

impl Loaded {
    /// The looked-up columns for `keys`, missing keys taking `missing`'s one row; and the
    /// rows whose key was not found.
    pub fn lookup(
        &self,
        keys: &ArrayRef,
        missing: &RecordBatch,
    ) -> Result<(Vec<ArrayRef>, Vec<usize>)> {
        let mut picks = Vec::with_capacity(keys.len());
        let mut not_found = Vec::new();
        let mut found = |row: usize, at: Option<&u32>| match at {
            Some(&i) => picks.push((0, i as usize)),
            None => {
                picks.push((1, 0));
                not_found.push(row);
            }
        };
        match (&self.index, keys.data_type().is_integer()) {
            (Index::Int(index), true) => {
                let ints =
                    cast(keys, &DataType::Int64).map_err(|e| Error::arrow("reading keys", e))?;
                let ints = ints.as_primitive::<arrow::datatypes::Int64Type>();
                for row in 0..ints.len() {
                    found(
                        row,
                        ints.is_valid(row)
                            .then(|| index.get(&ints.value(row)))
                            .flatten(),
                    );
                }
            }
            (Index::Int(index), false) => {
                let text =
                    cast(keys, &DataType::Utf8).map_err(|e| Error::arrow("reading keys", e))?;
                let text = text.as_string::<i32>();
                for row in 0..text.len() {
                    let key = text
                        .is_valid(row)
                        .then(|| text.value(row).parse::<i64>().ok())
                        .flatten();
                    found(row, key.and_then(|k| index.get(&k)));
                }
            }
            (Index::Text(index), _) => {
                let text = keys_as_text(keys)?;
                let mut buf = String::new();
                let n = match &text {
                    KeyText::Str(s) => s.len(),
                    KeyText::Int(i) => i.len(),
                };
                for row in 0..n {
                    found(row, key_at(&text, row, &mut buf).and_then(|k| index.get(k)));
                }
            }
        }
        let columns = (0..self.values.num_columns())
            .map(|c| {
                interleave(
                    &[self.values.column(c).as_ref(), missing.column(c).as_ref()],
                    &picks,
                )
                .map_err(|e| Error::arrow("assembling looked-up values", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((columns, not_found))
    }
}

/// The file's modification time and size: a file being rewritten changes one or the other.
fn version(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads the file, keeps the key and the wanted columns, and indexes the key. A file that
/// changes while it is read (a copy in progress) is not taken: replace a table by writing
/// a new file and renaming it over the old one.
fn read_table(path: &Path, key: &str, columns: Option<&SchemaSpec>) -> Result<Loaded> {
    let where_ = path.display();
    let before = version(path);
    let table = read_file(path).map_err(|e| Error::Plan(format!("lookup table {where_}: {e}")))?;
    if version(path) != before {
        return plan_err!(
            "lookup table {where_} changed while it was read; write a new file and rename it over the old one"
        );
    }
    let keys = table.column_by_name(key).ok_or_else(|| {
        Error::Plan(format!(
            "lookup table {where_} has no key column `{key}` (it has: {})",
            names(&table.schema())
        ))
    })?;
    if !super::is_key_type(keys.data_type()) {
        return plan_err!(
            "lookup table {where_}: the key column `{key}` is {}, not text or an integer",
            keys.data_type()
        );
    }
    let (fields, values): (Vec<_>, Vec<_>) = match columns {
        Some(spec) => spec
            .0
            .iter()
            .map(|f| {
                let field = &f.0;
                let column = table.column_by_name(field.name()).ok_or_else(|| {
                    Error::Plan(format!(
                        "lookup table {where_} has no column `{}` (it has: {})",
                        field.name(),
                        names(&table.schema())
                    ))
                })?;
                let column = cast(column, field.data_type()).map_err(|e| {
                    Error::Plan(format!(
                        "lookup table {where_}: column `{}` is not {}: {e}",
                        field.name(),
                        field.data_type()
                    ))
                })?;
                Ok((field.clone().with_nullable(true), column))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip(),
        None => table
            .schema()
            .fields()
            .iter()
            .zip(table.columns())
            .filter(|(f, _)| f.name() != key)
            .map(|(f, c)| (f.as_ref().clone().with_nullable(true), c.clone()))
            .unzip(),
    };
    let values = RecordBatch::try_new(Arc::new(Schema::new(fields)), values)
        .map_err(|e| Error::Plan(format!("lookup table {where_}: {e}")))?;
    let rows = u32::try_from(table.num_rows()).map_err(|_| {
        Error::Plan(format!(
            "lookup table {where_} has more than 4 billion rows"
        ))
    })?;
    let mut duplicates = 0usize;
    let index = if keys.data_type().is_integer() {
        let ints = cast(keys, &DataType::Int64)
            .map_err(|e| Error::arrow(format!("lookup table {where_}: its keys"), e))?;
        let ints = ints.as_primitive::<arrow::datatypes::Int64Type>();
        let mut map = HashMap::with_capacity(rows as usize);
        for row in (0..rows).filter(|&r| ints.is_valid(r as usize)) {
            duplicates += usize::from(map.insert(ints.value(row as usize), row).is_some());
        }
        Index::Int(map)
    } else {
        let text = cast(keys, &DataType::Utf8)
            .map_err(|e| Error::arrow(format!("lookup table {where_}: its keys"), e))?;
        let text = text.as_string::<i32>();
        let mut map = HashMap::with_capacity(rows as usize);
        for row in (0..rows).filter(|&r| text.is_valid(r as usize)) {
            duplicates += usize::from(
                map.insert(Box::from(text.value(row as usize)), row)
                    .is_some(),
            );
        }
        Index::Text(map)
    };
    if duplicates > 0 {
        tracing::warn!(file = %where_, duplicates, "lookup table has repeated keys; the last row of each wins");
    }
    Ok(Loaded {
        version: before,
        values,
        index,
    })
}

fn names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The whole file as one batch.
fn read_file(path: &Path) -> Result<RecordBatch, Box<dyn std::error::Error + Send + Sync>> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let file = File::open(path)?;
    let (schema, batches): (SchemaRef, Vec<RecordBatch>) = match extension.as_str() {
        "parquet" => {
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?;
            let schema = builder.schema().clone();
            let reader = builder.build()?;
            (schema, reader.collect::<Result<_, _>>()?)
        }
        "csv" => {
            let mut file = file;
            let (schema, _) = arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(&mut file, None)?;
            file.rewind()?;
            let schema = Arc::new(schema);
            let reader = arrow::csv::ReaderBuilder::new(schema.clone())
                .with_header(true)
                .build(file)?;
            (schema, reader.collect::<Result<_, _>>()?)
        }
        "jsonl" | "json" | "ndjson" => {
            let mut reader = BufReader::new(file);
            let (schema, _) =
                arrow::json::reader::infer_json_schema_from_seekable(&mut reader, None)?;
            let schema = Arc::new(schema);
            let reader = arrow::json::ReaderBuilder::new(schema.clone()).build(reader)?;
            (schema, reader.collect::<Result<_, _>>()?)
        }
        other => {
            return Err(
                format!("unknown file type `.{other}`: use .parquet, .csv or .jsonl").into(),
            );
        }
    };
    Ok(concat_batches(&schema, &batches)?)
}
