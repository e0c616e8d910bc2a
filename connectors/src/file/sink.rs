//! The file sink: rolling JSON lines or Parquet files in a directory.
//!
//! A file is written as `.{prefix}-{seq}.{ext}.tmp` and, when it is complete (size or age
//! reached, a flush, or the end of the run), synced to disk and renamed to
//! `{prefix}-{seq}.{ext}`. A reader listing the directory sees only whole files. Sequence
//! numbers continue after the highest one already in the directory, so a restarted pipeline
//! never overwrites earlier output.
//!
//! Several writers may share a directory, each with its own prefix (the members of a worker
//! group write `{prefix}-{member}-{seq}`): a sink counts, and removes as leftovers of a
//! crash, only files whose names are exactly its own, never another writer's.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::json::writer::LineDelimited;
use async_trait::async_trait;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sluice_engine::sink::Sink;
use sluice_engine::{Error, Result};

use super::{FileFormat, FileSinkConfig};

pub struct FileSink {
    config: FileSinkConfig,
    next_seq: u64,
    current: Option<OpenFile>,
    files: u64,
    rows: u64,
    bytes: u64,
}

struct OpenFile {
    tmp: PathBuf,
    path: PathBuf,
    writer: FileWriter,
    opened: Instant,
}

enum FileWriter {
    Json(arrow::json::Writer<BufWriter<Counted>, LineDelimited>),
    Parquet(ArrowWriter<File>),
}

/// A file that counts the bytes written to it.
struct Counted {
    file: File,
    bytes: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl FileWriter {
    fn size(&self) -> u64 {
        match self {
            FileWriter::Json(w) => w.get_ref().get_ref().bytes + w.get_ref().buffer().len() as u64,
            FileWriter::Parquet(w) => (w.bytes_written() + w.in_progress_size()) as u64,
        }
    }
}

impl FileSink {
    /// Creates the directory if needed and finds where the sequence continues.
    pub fn open(config: FileSinkConfig) -> Result<Self> {
        let dir = &config.path;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut next_seq = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
            let name = name.to_string_lossy();
            // A file a crashed run left unfinished: its records were never checkpointed and
            // will be written again, so it goes.
            if let Some(unfinished) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp"))
                && sequence(&config, unfinished).is_some()
            {
                let stale = dir.join(&*name);
                tracing::info!(file = %stale.display(), "removing an unfinished file of an earlier run");
                std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
                continue;
            }
            if let Some(seq) = sequence(&config, &name) {
                next_seq = next_seq.max(seq + 1);
            }
        }
        Ok(FileSink {
            config,
            next_seq,
            current: None,
            files: 0,
            rows: 0,
            bytes: 0,
        })
    }

    fn start_file(&mut self, batch: &RecordBatch) -> Result<OpenFile> {
        let dir = &self.config.path;
        let name = format!(
            "{}-{:05}.{}",
            self.config.prefix,
            self.next_seq,
            self.config.format.extension()
        );
        self.next_seq += 1;
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let writer = match self.config.format {
            FileFormat::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .build();
                FileWriter::Parquet(
                    ArrowWriter::try_new(file, batch.schema(), Some(props))
                        .map_err(|e| parquet_error(&tmp, e))?,
                )
            }
            _ => FileWriter::Json(crate::json::lines_writer(BufWriter::with_capacity(
                1 << 20,
                Counted { file, bytes: 0 },
            ))),
        };
        Ok(OpenFile {
            path: dir.join(name),
            tmp,
            writer,
            opened: Instant::now(),
        })
    }

    /// Completes the open file: everything to disk, then the rename that makes it visible.
    fn roll(&mut self) -> Result<()> {
        let Some(open) = self.current.take() else {
            return Ok(());
        };
        let size = open.writer.size();
        let file = match open.writer {
            FileWriter::Json(mut w) => {
                w.finish()
                    .map_err(|e| Error::arrow(open.tmp.display().to_string(), e))?;
                let counted = w
                    .into_inner()
                    .into_inner()
                    .map_err(|e| Error::io(&open.tmp, e.into_error()))?;
                counted.file
            }
            FileWriter::Parquet(w) => w.into_inner().map_err(|e| parquet_error(&open.tmp, e))?,
        };
        file.sync_all().map_err(|e| Error::io(&open.tmp, e))?;
        drop(file);
        std::fs::rename(&open.tmp, &open.path).map_err(|e| Error::io(&open.path, e))?;
        sync_dir(&self.config.path)?;
        self.files += 1;
        self.bytes += size;
        Ok(())
    }
}

/// The sequence number of `name` if it is exactly a name this sink writes,
/// `{prefix}-{digits}.{ext}`. Other writers in the directory (the other members of a worker
/// group, a replay beside the pipeline) have prefixes that extend this one, `part-w2-…` or
/// `part-replay-…`: their files are neither counted nor ever removed.
fn sequence(config: &FileSinkConfig, name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(config.prefix.as_str())?
        .strip_prefix('-')?
        .strip_suffix(config.format.extension())?
        .strip_suffix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if self.current.is_none() {
            self.current = Some(self.start_file(&batch)?);
        }
        let open = self.current.as_mut().expect("just opened");
        match &mut open.writer {
            FileWriter::Json(w) => w
                .write(&batch)
                .map_err(|e| Error::arrow(open.tmp.display().to_string(), e))?,
            FileWriter::Parquet(w) => w.write(&batch).map_err(|e| parquet_error(&open.tmp, e))?,
        }
        self.rows += batch.num_rows() as u64;
        if open.writer.size() >= self.config.max_file_size.0 {
            self.roll()?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.roll()
    }

    async fn close(&mut self) -> Result<()> {
        self.roll()
    }

    fn tick_interval(&self) -> Option<Duration> {
        self.config.max_file_age.map(|age| {
            age.get()
                .clamp(Duration::from_millis(10), Duration::from_secs(1))
        })
    }

    async fn tick(&mut self) -> Result<()> {
        let expired = match (&self.current, self.config.max_file_age) {
            (Some(open), Some(age)) => open.opened.elapsed() >= age.get(),
            _ => false,
        };
        if expired { self.roll() } else { Ok(()) }
    }

    fn summary(&self) -> String {
        format!(
            "{} rows in {} {} file{} ({}) under {}",
            self.rows,
            self.files,
            self.config.format.extension(),
            if self.files == 1 { "" } else { "s" },
            sluice_engine::config::ByteSize(self.bytes),
            self.config.path.display()
        )
    }
}

/// The Parquet writer's error as the engine's: the file system's faults stay I/O errors
/// (a full disk may pass), the rest are the rows' encoding.
fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> Error {
    match e {
        parquet::errors::ParquetError::External(inner) => {
            match inner.downcast::<std::io::Error>() {
                Ok(io) => Error::io(path, *io),
                Err(other) => Error::arrow(
                    path.display().to_string(),
                    arrow::error::ArrowError::ExternalError(other),
                ),
            }
        }
        other => Error::arrow(path.display().to_string(), other.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(n: i64) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from_iter_values(0..n))],
        )
        .unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn config(dir: &Path, format: FileFormat, max: u64) -> FileSinkConfig {
        FileSinkConfig {
            path: dir.to_path_buf(),
            format,
            max_file_size: sluice_engine::config::ByteSize(max),
            max_file_age: None,
            prefix: "part".into(),
        }
    }

    #[tokio::test]
    async fn rolls_by_size_and_only_renames_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::open(config(dir.path(), FileFormat::Jsonl, 100)).unwrap();
        sink.write(batch(20)).await.unwrap(); // > 100 bytes: rolled at once
        sink.write(batch(2)).await.unwrap(); // small: stays open under a temporary name
        assert_eq!(
            names(dir.path()),
            vec![".part-00001.jsonl.tmp", "part-00000.jsonl"]
        );
        sink.close().await.unwrap();
        assert_eq!(
            names(dir.path()),
            vec!["part-00000.jsonl", "part-00001.jsonl"]
        );
        let text = std::fs::read_to_string(dir.path().join("part-00001.jsonl")).unwrap();
        assert_eq!(text, "{\"n\":0}\n{\"n\":1}\n");

        // A second run continues the sequence instead of overwriting, and removes what a
        // crashed run left unfinished.
        std::fs::write(dir.path().join(".part-00007.jsonl.tmp"), "half a ro").unwrap();
        let mut again = FileSink::open(config(dir.path(), FileFormat::Jsonl, 100)).unwrap();
        again.write(batch(1)).await.unwrap();
        again.close().await.unwrap();
        assert_eq!(
            names(dir.path()),
            vec!["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
        );
    }

    /// Writers sharing a directory (the members of a worker group, a replay beside the
    /// pipeline) each have a prefix of their own, which extends another's: `part` must
    /// neither delete nor count the unfinished and complete files of `part-w2`.
    #[tokio::test]
    async fn cleans_and_counts_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let others = [
            ".part-w2-00000.jsonl.tmp",
            ".part-00001-x.jsonl.tmp",
            ".part-.jsonl.tmp",
            ".part-00002.parquet.tmp",
            "part-w2-00007.jsonl",
        ];
        for name in others {
            std::fs::write(dir.path().join(name), "theirs").unwrap();
        }
        std::fs::write(dir.path().join(".part-00003.jsonl.tmp"), "half a ro").unwrap();
        std::fs::write(dir.path().join("part-00002.jsonl"), "{\"n\":0}\n").unwrap();
        let mut sink = FileSink::open(config(dir.path(), FileFormat::Jsonl, 1 << 30)).unwrap();
        let mut want: Vec<String> = others.iter().map(|n| n.to_string()).collect();
        want.push("part-00002.jsonl".into());
        want.sort();
        assert_eq!(names(dir.path()), want, "only its own leftover is gone");
        sink.write(batch(1)).await.unwrap();
        sink.close().await.unwrap();
        want.push("part-00003.jsonl".into());
        want.sort();
        assert_eq!(
            names(dir.path()),
            want,
            "the sequence goes on after its own files"
        );
        for name in others {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(name)).unwrap(),
                "theirs"
            );
        }
    }

    #[tokio::test]
    async fn rolls_by_age_on_tick_without_new_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), FileFormat::Jsonl, 1 << 30);
        cfg.max_file_age = Some(sluice_engine::config::Duration::from_millis(30));
        let mut sink = FileSink::open(cfg).unwrap();
        assert_eq!(sink.tick_interval(), Some(Duration::from_millis(30)));
        sink.write(batch(3)).await.unwrap();
        sink.tick().await.unwrap();
        assert_eq!(
            names(dir.path()),
            vec![".part-00000.jsonl.tmp"],
            "too young to roll"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        sink.tick().await.unwrap();
        assert_eq!(names(dir.path()), vec!["part-00000.jsonl"]);
        assert!(
            sink.summary().starts_with("3 rows in 1 jsonl file"),
            "{}",
            sink.summary()
        );
    }

    #[tokio::test]
    async fn parquet_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::open(config(dir.path(), FileFormat::Parquet, 1 << 30)).unwrap();
        sink.write(batch(1000)).await.unwrap();
        sink.write(batch(500)).await.unwrap();
        sink.close().await.unwrap();
        let file = File::open(dir.path().join("part-00000.parquet")).unwrap();
        let rows: usize =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024)
                .unwrap()
                .map(|b| b.unwrap().num_rows())
                .sum();
        assert_eq!(rows, 1500);
    }
}
