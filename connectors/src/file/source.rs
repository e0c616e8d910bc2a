//! The file source: a file or a directory of files, one partition per file.
//!
//! `_offset` is the record's position in its file, counting from 0 (blank lines of a JSON
//! lines file are skipped and not counted). A record that does not decode stops the read
//! with an error naming the file, the line, the offset and the reason: the batch is decoded
//! in one call, and only when that fails are its records decoded one by one to find the bad
//! one.
//!
//! Reads are synchronous: a local file is read a batch at a time, and decoding, not I/O,
//! dominates. `read` has no await point, so it is cancel safe.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use sluice_engine::batch::{self, Envelope, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::dead_letter::{DeadLetter, SOURCE_STAGE};
use sluice_engine::source::{Assignment, PartitionReader, Source};
use sluice_engine::{Error, ErrorClass, Result};

use super::{FileFormat, FileSourceConfig};

const INFER_RECORDS: usize = 1000;

pub struct FileSource {
    files: Vec<PathBuf>,
    format: FileFormat,
    records: SchemaRef,
    schema: SchemaRef,
    config: FileSourceConfig,
    batch_size: usize,
    next: usize,
    start: Arc<Checkpoint>,
    dead_letters: bool,
}

impl FileSource {
    /// Lists the files and settles the schema (declared, inferred, or from Parquet).
    pub fn open(config: FileSourceConfig, batch_size: usize) -> Result<Self> {
        let files = list_files(&config.path)?;
        let format = match config.resolved_format() {
            Some(f) => f,
            None => {
                let formats: Vec<_> = files.iter().map(|f| FileFormat::from_path(f)).collect();
                match formats.first() {
                    Some(Some(f)) if formats.iter().all(|g| *g == Some(*f)) => *f,
                    _ => {
                        return Err(Error::Plan(format!(
                            "the files in `{}` do not share one known extension: set `format`",
                            config.path.display()
                        )));
                    }
                }
            }
        };
        let text = matches!(format, FileFormat::Jsonl | FileFormat::Csv);
        if text && config.schema.is_none() && !config.infer_schema {
            return Err(Error::Plan(format!(
                "the {} files in `{}` need a `schema`, or `infer_schema: true`",
                format.extension(),
                config.path.display()
            )));
        }
        let records: SchemaRef = match (&config.schema, format) {
            (Some(spec), _) => spec.to_arrow(),
            (None, FileFormat::Parquet) => parquet_schema(&files[0])?,
            (None, FileFormat::Jsonl) => infer_jsonl(&files[0])?,
            (None, FileFormat::Csv) => infer_csv(&files[0], &config)?,
        };
        let schema = batch::with_metadata(&records)?;
        Ok(FileSource {
            files,
            format,
            records,
            schema,
            config,
            batch_size: batch_size.max(1),
            next: 0,
            start: Arc::default(),
            dead_letters: false,
        })
    }

    /// JSON lines records that do not decode become dead letters instead of stopping the
    /// run (CSV and Parquet files still stop at a bad record).
    pub fn with_dead_letters(mut self, dead_letters: bool) -> Self {
        self.dead_letters = dead_letters;
        self
    }

    fn reader(&self, index: usize) -> Result<Box<dyn PartitionReader>> {
        let path = &self.files[index];
        let info = Arc::new(PartitionInfo {
            id: index as u32,
            name: path.display().to_string().into(),
        });
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let common = Common {
            skip: self.start.start_of(&info.name),
            info,
            schema: self.schema.clone(),
            records: self.records.clone(),
            next_offset: 0,
            done: false,
        };
        Ok(match self.format {
            FileFormat::Jsonl => Box::new(JsonlReader {
                common,
                file: BufReader::with_capacity(1 << 20, file),
                line: 0,
                buf: Vec::new(),
                starts: Vec::new(),
                lines: Vec::new(),
                max_record: self.config.max_record_size.0 as usize,
                lenient: self
                    .dead_letters
                    .then(|| crate::json::JsonDecoder::new(self.records.clone())),
                oversized: Vec::new(),
            }),
            FileFormat::Csv => Box::new(CsvReader {
                decoder: csv_builder(self.records.clone(), &self.config)
                    .with_batch_size(self.batch_size)
                    .build_decoder(),
                common,
                file: BufReader::with_capacity(1 << 20, file),
                batch_size: self.batch_size,
                max_record: self.config.max_record_size.0 as usize,
                partial: 0,
            }),
            FileFormat::Parquet => {
                let batch_size = self.batch_size;
                let reader = unpanicked(path, || {
                    ParquetRecordBatchReaderBuilder::try_new(file)
                        .and_then(|b| b.with_batch_size(batch_size).build())
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| {
                    Error::Plan(format!(
                        "{}: not a readable Parquet file: {e}",
                        path.display()
                    ))
                })?;
                Box::new(ParquetReader { common, reader })
            }
        })
    }
}

#[async_trait]
impl Source for FileSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn partition_hint(&self) -> usize {
        self.files.len()
    }

    fn restore(&mut self, checkpoint: Arc<Checkpoint>) {
        self.start = checkpoint;
    }

    async fn next_assignment(&mut self) -> Result<Option<Assignment>> {
        if self.next >= self.files.len() {
            return Ok(None);
        }
        let reader = self.reader(self.next)?;
        self.next += 1;
        Ok(Some(Assignment::Assign(reader)))
    }
}

fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let entry = entry.map_err(|e| Error::io(path, e))?;
        let name = entry.file_name();
        let hidden = name.to_string_lossy().starts_with('.');
        if !hidden
            && entry
                .file_type()
                .map_err(|e| Error::io(entry.path(), e))?
                .is_file()
        {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Plan(format!(
            "the directory `{}` has no files to read",
            path.display()
        )));
    }
    Ok(files)
}

fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    unpanicked(path, || {
        ParquetRecordBatchReaderBuilder::try_new(file)
            .map(|b| b.schema().clone())
            .map_err(|e| e.to_string())
    })
    .map_err(|e| {
        Error::Plan(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    })
}

/// Runs a Parquet decoder step on bytes from outside, with a panic taken as the file's
/// fault: the parquet crate still has asserts that malformed files reach (its fuzzers
/// keep finding them), and one bad file must stop the run with its name, not a panic.
fn unpanicked<T>(
    path: &Path,
    step: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(format!(
            "the Parquet reader failed on {} (a malformed file): {what}",
            path.display()
        ))
    })
}

fn infer_jsonl(path: &Path) -> Result<SchemaRef> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let (schema, _) =
        arrow::json::reader::infer_json_schema(BufReader::new(file), Some(INFER_RECORDS))
            .map_err(|e| Error::Plan(format!("{}: cannot infer a schema: {e}", path.display())))?;
    Ok(Arc::new(schema))
}

fn infer_csv(path: &Path, config: &FileSourceConfig) -> Result<SchemaRef> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let (schema, _) = arrow::csv::reader::Format::default()
        .with_header(config.header)
        .with_delimiter(config.delimiter as u8)
        .infer_schema(file, Some(INFER_RECORDS))
        .map_err(|e| Error::Plan(format!("{}: cannot infer a schema: {e}", path.display())))?;
    Ok(Arc::new(schema))
}

fn csv_builder(schema: SchemaRef, config: &FileSourceConfig) -> arrow::csv::ReaderBuilder {
    arrow::csv::ReaderBuilder::new(schema)
        .with_header(config.header)
        .with_header_validation(config.header)
        .with_delimiter(config.delimiter as u8)
}

/// What every file reader shares.
struct Common {
    /// Records before this offset were processed by an earlier run: read and dropped.
    skip: i64,
    info: Arc<PartitionInfo>,
    schema: SchemaRef,
    records: SchemaRef,
    next_offset: i64,
    done: bool,
}

impl Common {
    /// Gives decoded records their offsets; records before `skip` yield an empty envelope.
    fn envelope(&mut self, records: RecordBatch) -> Result<Envelope> {
        let mut records = records;
        let mut first = self.next_offset;
        if first < self.skip {
            let drop = ((self.skip - first) as usize).min(records.num_rows());
            records = records.slice(drop, records.num_rows() - drop);
            first += drop as i64;
            self.next_offset = first;
        }
        let batch = batch::append_metadata(&self.schema, records, self.info.id, first, None, None)?;
        self.next_offset += batch.num_rows() as i64;
        Ok(Envelope {
            partition: self.info.clone(),
            offsets: first..self.next_offset,
            batch,
            dead: Vec::new(),
        })
    }

    fn bad(&self, at: String, reason: String) -> Error {
        Error::BadRecord {
            origin: format!("{} {at}", self.info.name),
            reason,
        }
    }
}

struct JsonlReader {
    common: Common,
    file: BufReader<File>,
    /// Lines consumed so far.
    line: u64,
    /// The lines of the batch being read, back to back.
    buf: Vec<u8>,
    /// For each record of `buf`: where it starts, and its line number.
    starts: Vec<usize>,
    lines: Vec<u64>,
    max_record: usize,
    /// With a dead-letter sink: decodes record by record when a batch fails.
    lenient: Option<crate::json::JsonDecoder>,
    /// Records of the batch (by index) cut at max_record_size (with a dead-letter sink).
    oversized: Vec<usize>,
}

impl JsonlReader {
    /// Appends the next line to `buf`; false at the end of the file.
    fn next_line(&mut self) -> Result<bool> {
        let start = self.buf.len();
        loop {
            let available = match self.file.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(&*self.common.info.name, e)),
            };
            if available.is_empty() {
                return Ok(self.buf.len() > start);
            }
            let (take, complete) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            if self.buf.len() - start + take > self.max_record + 1 {
                if self.lenient.is_some() {
                    // A dead letter of its first max_record_size bytes; the rest is skipped.
                    let room = (self.max_record + 1).saturating_sub(self.buf.len() - start);
                    self.buf.extend_from_slice(&available[..room.min(take)]);
                    self.file.consume(take);
                    if !complete {
                        self.skip_rest_of_line()?;
                    }
                    self.oversized.push(self.starts.len());
                    return Ok(true);
                }
                let line = self.line + 1;
                return Err(self.common.bad(
                    format!("line {line}"),
                    format!(
                        "the record is larger than max_record_size ({})",
                        sluice_engine::config::ByteSize(self.max_record as u64)
                    ),
                ));
            }
            self.buf.extend_from_slice(&available[..take]);
            self.file.consume(take);
            if complete {
                return Ok(true);
            }
        }
    }
}

#[async_trait]
impl PartitionReader for JsonlReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.common.info
    }

    async fn read(&mut self, max: usize) -> Result<Option<Envelope>> {
        if self.common.done {
            return Ok(None);
        }
        self.buf.clear();
        self.starts.clear();
        self.lines.clear();
        self.oversized.clear();
        while self.starts.len() < max {
            let start = self.buf.len();
            if !self.next_line()? {
                self.common.done = true;
                break;
            }
            self.line += 1;
            let cut = self.oversized.last() == Some(&self.starts.len());
            if !cut && self.buf[start..].iter().all(u8::is_ascii_whitespace) {
                self.buf.truncate(start);
                continue;
            }
            self.starts.push(start);
            self.lines.push(self.line);
        }
        if self.starts.is_empty() {
            return Ok(None);
        }
        if !self.oversized.is_empty() {
            return self.keeping_bad().map(Some);
        }
        match crate::json::decode_records(&self.common.records, &self.buf, &self.starts) {
            Ok(records) => self.common.envelope(records).map(Some),
            Err(_) if self.lenient.is_some() => self.keeping_bad().map(Some),
            Err(e) => {
                let first = self.common.next_offset;
                let at = match e.index {
                    Some(i) => format!("line {} (offset {})", self.lines[i], first + i as i64),
                    None => format!("offsets {first}..={}", first + self.starts.len() as i64 - 1),
                };
                Err(self.common.bad(at, e.reason))
            }
        }
    }
}

impl JsonlReader {
    /// Consumes the file up to and including the next newline.
    fn skip_rest_of_line(&mut self) -> Result<()> {
        self.file
            .skip_until(b'\n')
            .map(drop)
            .map_err(|e| Error::io(&*self.common.info.name, e))
    }

    /// The batch's records that decode, with their own offsets; the others as dead letters
    /// with their line as it was.
    fn keeping_bad(&mut self) -> Result<Envelope> {
        let n = self.starts.len();
        let first = self.common.next_offset;
        let slices: Vec<&[u8]> = (0..n)
            .map(|i| {
                let end = self.starts.get(i + 1).copied().unwrap_or(self.buf.len());
                &self.buf[self.starts[i]..end]
            })
            .collect();
        let decoder = self.lenient.as_mut().expect("lenient decoder");
        // Records cut at max_record_size fail whatever their first bytes say.
        let inputs: Vec<&[u8]> = slices
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if self.oversized.contains(&i) {
                    &b""[..]
                } else {
                    *s
                }
            })
            .collect();
        let (records, mut bad) = decoder.decode_each(&inputs);
        for (i, reason) in &mut bad {
            if self.oversized.contains(i) {
                *reason = format!(
                    "the record is larger than max_record_size ({}); its first bytes are kept",
                    sluice_engine::config::ByteSize(self.max_record as u64)
                );
            }
        }
        let records = records
            .map_err(|e| Error::Internal(format!("records that decoded alone: {}", e.reason)))?;
        let skip = self.common.skip;
        let now = sluice_engine::dead_letter::now_ms();
        let mut dead = Vec::with_capacity(bad.len());
        let mut good_offsets = Vec::with_capacity(records.num_rows());
        let mut b = bad.iter().peekable();
        for (i, slice) in slices.iter().enumerate() {
            let offset = first + i as i64;
            if let Some((_, reason)) = b.next_if(|(j, _)| *j == i) {
                if offset >= skip {
                    let line = slice.strip_suffix(b"\n").unwrap_or(slice);
                    dead.push(DeadLetter {
                        stage: SOURCE_STAGE.into(),
                        class: ErrorClass::Decode,
                        reason: format!("line {}: {reason}", self.lines[i]),
                        attempts: 1,
                        partition: self.common.info.clone(),
                        offset: Some(offset),
                        key: None,
                        headers: Vec::new(),
                        first_failed_at: now,
                        last_failed_at: now,
                        payload: line.to_vec(),
                    });
                }
            } else {
                good_offsets.push(offset);
            }
        }
        // Records an earlier run processed are dropped, good and bad alike.
        let keep_from = good_offsets.iter().take_while(|o| **o < skip).count();
        let records = records.slice(keep_from, records.num_rows() - keep_from);
        let offsets = arrow::array::Int64Array::from(good_offsets[keep_from..].to_vec());
        let batch = batch::append_metadata_at(
            &self.common.schema,
            records,
            self.common.info.id,
            offsets,
            None,
            None,
        )?;
        self.common.next_offset = first + n as i64;
        Ok(Envelope {
            partition: self.common.info.clone(),
            offsets: first.max(skip.min(first + n as i64))..first + n as i64,
            batch,
            dead,
        })
    }
}

struct CsvReader {
    common: Common,
    file: BufReader<File>,
    decoder: arrow::csv::reader::Decoder,
    batch_size: usize,
    max_record: usize,
    /// Bytes given to the decoder since it last finished a row: the record in progress
    /// (over by less than one read at most), held to `max_record`.
    partial: usize,
}

#[async_trait]
impl PartitionReader for CsvReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.common.info
    }

    async fn read(&mut self, _max: usize) -> Result<Option<Envelope>> {
        if self.common.done {
            return Ok(None);
        }
        let first = self.common.next_offset;
        loop {
            if self.decoder.capacity() == 0 {
                break;
            }
            let available = match self.file.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(&*self.common.info.name, e)),
            };
            if available.is_empty() {
                self.common.done = true;
                break;
            }
            let before = self.decoder.capacity();
            let used = self.decoder.decode(available).map_err(|e| {
                self.common
                    .bad(format!("after offset {first}"), clean_csv_error(&e))
            })?;
            self.file.consume(used);
            self.partial = if self.decoder.capacity() == before {
                self.partial + used
            } else {
                0
            };
            if self.partial > self.max_record {
                let at = first + (self.batch_size - self.decoder.capacity()) as i64;
                return Err(self.common.bad(
                    format!("offset {at}"),
                    format!(
                        "the record is larger than max_record_size ({})",
                        sluice_engine::config::ByteSize(self.max_record as u64)
                    ),
                ));
            }
        }
        match self.decoder.flush() {
            Ok(Some(records)) => self.common.envelope(records).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(self
                .common
                .bad(format!("offsets from {first}"), clean_csv_error(&e))),
        }
    }
}

fn clean_csv_error(e: &arrow::error::ArrowError) -> String {
    let text = e.to_string();
    text.strip_prefix("Csv error: ")
        .or_else(|| text.strip_prefix("Parser error: "))
        .unwrap_or(&text)
        .to_string()
}

struct ParquetReader {
    common: Common,
    reader: ParquetRecordBatchReader,
}

impl ParquetReader {
    /// Selects the declared columns by name and casts them to the declared types.
    fn conform(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let want: &Schema = &self.common.records;
        if batch.schema().fields() == want.fields() {
            return Ok(batch);
        }
        let mut columns = Vec::with_capacity(want.fields().len());
        for field in want.fields() {
            let column = match batch.column_by_name(field.name()) {
                Some(c) => cast(c, field.data_type()).map_err(|e| {
                    self.common.bad(
                        format!("column `{}`", field.name()),
                        format!("cannot read as {}: {e}", field.data_type()),
                    )
                })?,
                None if field.is_nullable() => {
                    arrow::array::new_null_array(field.data_type(), batch.num_rows())
                }
                None => {
                    return Err(self.common.bad(
                        "schema".into(),
                        format!(
                            "the file has no column `{}`, declared nullable: false",
                            field.name()
                        ),
                    ));
                }
            };
            columns.push(column);
        }
        RecordBatch::try_new(self.common.records.clone(), columns)
            .map_err(|e| self.common.bad("schema".into(), e.to_string()))
    }
}

#[async_trait]
impl PartitionReader for ParquetReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.common.info
    }

    async fn read(&mut self, _max: usize) -> Result<Option<Envelope>> {
        let path = Path::new(&*self.common.info.name);
        let reader = &mut self.reader;
        match unpanicked(path, || {
            reader.next().transpose().map_err(|e| e.to_string())
        })
        .transpose()
        {
            None => Ok(None),
            Some(Err(e)) => Err(self
                .common
                .bad(format!("after offset {}", self.common.next_offset), e)),
            Some(Ok(batch)) => {
                let records = self.conform(batch)?;
                self.common.envelope(records).map(Some)
            }
        }
    }
}
