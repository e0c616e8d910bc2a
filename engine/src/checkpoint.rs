//! Checkpoints: how far each partition has been processed, kept in RocksDB.
//!
//! # What a checkpoint promises
//! A checkpoint records, per partition, the next offset to read. It is taken by the sink
//! task: the sink is flushed first (every batch written so far is durable and visible), and
//! only then are the offsets of those batches committed, in one atomic RocksDB write batch
//! synced to disk. So a checkpoint never covers a record that is not in the sink: after a
//! crash at any moment, restarting from the last checkpoint loses nothing, and the records
//! written after it are written again (at-least-once; duplicates are bounded by one
//! checkpoint interval).
//!
//! Offsets reach the sink task in partition order even when a stage filters every row of a
//! batch out: workers forward empty batches so that their offsets are counted as done.
//!
//! Partitions are keyed by name (`data/views.jsonl`, `generator/3`, later `topic/3`), so a
//! partition's position survives a change in how partitions are numbered or assigned.
//!
//! # Stores
//! [`RocksStore`] is the real store. [`MemoryStore`] serves tests; both pass the same tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Per partition name, the next offset to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Increases by one with every committed checkpoint; 0 when nothing was committed.
    pub id: u64,
    pub offsets: BTreeMap<String, i64>,
}

impl Checkpoint {
    /// Where `partition` starts: its next offset, or 0.
    pub fn start_of(&self, partition: &str) -> i64 {
        self.offsets.get(partition).copied().unwrap_or(0)
    }
}

/// Where checkpoints are kept.
///
/// # Errors
/// I/O and corruption errors of the store; a failed `commit` leaves the previous checkpoint
/// in place.
pub trait CheckpointStore: Send + Sync {
    /// The last committed checkpoint (empty when there is none).
    fn load(&self) -> Result<Checkpoint>;

    /// Atomically replaces the offsets of the partitions in `checkpoint` and its id; other
    /// partitions keep theirs. Durable when it returns. A store with a database
    /// ([`CheckpointStore::db`]) commits the state written there with the offsets.
    fn commit(&self, checkpoint: &Checkpoint) -> Result<()>;

    /// The database stateful stages keep their state in, when the store has one.
    fn db(&self) -> Option<Arc<StateDb>> {
        None
    }
}

/// The database stage state is kept in. A scratch store's temporary directory goes with
/// the last handle, after the database has closed (fields drop in order): removed earlier,
/// the database's shutdown flush failed and RocksDB waited a second before giving up.
pub struct StateDb {
    db: rocksdb::DB,
    /// A scratch store's directory (state that needs somewhere to spill, no restarts).
    scratch: Option<tempfile::TempDir>,
}

impl std::ops::Deref for StateDb {
    type Target = rocksdb::DB;

    fn deref(&self) -> &rocksdb::DB {
        &self.db
    }
}

/// A store in memory, for tests.
#[derive(Default)]
pub struct MemoryStore(Mutex<Checkpoint>);

impl CheckpointStore for MemoryStore {
    fn load(&self) -> Result<Checkpoint> {
        Ok(self.0.lock().expect("store lock").clone())
    }

    fn commit(&self, checkpoint: &Checkpoint) -> Result<()> {
        let mut current = self.0.lock().expect("store lock");
        current.id = checkpoint.id;
        for (k, v) in &checkpoint.offsets {
            current.offsets.insert(k.clone(), *v);
        }
        Ok(())
    }
}

const ID_KEY: &[u8] = b"meta/checkpoint_id";
const OFFSET_PREFIX: &str = "offset/";
const WRITE_BUFFER_BYTES: usize = 16 << 20;
const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// The file naming the last complete checkpoint, in the store's directory.
const LATEST: &str = "LATEST";

/// Checkpoints in RocksDB: offsets and the state of stateful stages in one database.
///
/// # Layout
/// ```text
/// DIR/db/               the working database: offsets and state as the run changes them
/// DIR/checkpoints/ID/   a RocksDB checkpoint: immutable, its table files hard links
/// DIR/LATEST            the ID of the last complete checkpoint (replaced by a rename)
/// ```
/// Stages write their state into the working database as they go (evicted entries,
/// finished windows); a checkpoint writes the offsets there too and then freezes the whole
/// database as a RocksDB checkpoint. So offsets and state are one atomic snapshot however
/// large the state is, and a checkpoint costs a memtable flush plus links to the table
/// files that did not change (incremental). The working database is never trusted after a
/// stop: opening the store rebuilds it from the checkpoint `LATEST` names, so a crash at
/// any moment, even in the middle of a checkpoint, restarts from the last complete one.
pub struct RocksStore {
    db: Arc<StateDb>,
    dir: PathBuf,
    /// Held while the store is open: a second process on the same directory would clear
    /// this one's working database.
    _lock: std::fs::File,
}

impl RocksStore {
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_in(dir, None)
    }

    /// A store in a temporary directory that lives as long as it: working space for stage
    /// state in a pipeline that does not checkpoint. Commits write offsets but keep no
    /// checkpoint.
    pub fn scratch() -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("sluice-state-")
            .tempdir()
            .map_err(|e| Error::Checkpoint {
                path: std::env::temp_dir(),
                message: format!("cannot make a scratch directory for stage state: {e}"),
            })?;
        let dir = temp.path().to_path_buf();
        Self::open_in(&dir, Some(temp))
    }

    fn open_in(dir: &Path, scratch: Option<tempfile::TempDir>) -> Result<Self> {
        let error = |message: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            message,
        };
        if dir.join("CURRENT").exists() {
            return Err(error(
                "this directory holds a checkpoint in the layout of an earlier Sluice (a bare \
                 RocksDB database); give the pipeline a new checkpoint directory"
                    .into(),
            ));
        }
        std::fs::create_dir_all(dir.join("checkpoints"))
            .map_err(|e| error(format!("cannot create the directory: {e}")))?;
        let lock = std::fs::File::create(dir.join("LOCK"))
            .map_err(|e| error(format!("cannot create the lock file: {e}")))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => error(
                "another process (a second `sluice run` of this pipeline?) is using this \
                 checkpoint directory"
                    .into(),
            ),
            std::fs::TryLockError::Error(e) => error(format!("cannot lock the directory: {e}")),
        })?;
        let working = dir.join("db");
        if working.exists() {
            std::fs::remove_dir_all(&working)
                .map_err(|e| error(format!("cannot clear the working database: {e}")))?;
        }
        let latest = read_latest(dir).map_err(|e| error(e.to_string()))?;
        if let Some(id) = latest {
            let frozen = dir.join("checkpoints").join(id.to_string());
            restore_copy(&frozen, &working).map_err(|e| {
                error(format!(
                    "cannot restore checkpoint {id} from {}: {e}",
                    frozen.display()
                ))
            })?;
        }
        // Checkpoints other than the latest are leftovers of a crash mid-checkpoint.
        remove_checkpoints_except(dir, latest);
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        // Memory the store itself may take, on top of the stages' state budgets: two write
        // buffers and the block cache (stated in docs/aggregation.md).
        options.set_write_buffer_size(WRITE_BUFFER_BYTES);
        options.set_max_write_buffer_number(2);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
        // Lookups of keys that were never written are the common miss. The filters stay in
        // memory with their tables (about 1.25 bytes per stored key), outside the cache: in
        // the cache, a large state's filters would push each other out.
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
        let db = rocksdb::DB::open(&options, &working).map_err(|e| error(e.into_string()))?;
        Ok(RocksStore {
            db: Arc::new(StateDb { db, scratch }),
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn error(&self, e: impl ToString) -> Error {
        Error::Checkpoint {
            path: self.dir.clone(),
            message: e.to_string(),
        }
    }

    /// Freezes the working database as checkpoint `id` and makes it the latest.
    fn freeze(&self, id: u64) -> Result<()> {
        let target = self.dir.join("checkpoints").join(id.to_string());
        if target.exists() {
            // Left by a crash before this id became the latest.
            std::fs::remove_dir_all(&target).map_err(|e| self.error(e))?;
        }
        rocksdb::checkpoint::Checkpoint::new(&self.db.db)
            .and_then(|c| c.create_checkpoint(&target))
            .map_err(|e| self.error(format!("cannot create checkpoint {id}: {e}")))?;
        write_latest(&self.dir, id).map_err(|e| self.error(e))?;
        remove_checkpoints_except(&self.dir, Some(id));
        Ok(())
    }
}

/// Writes without the write-ahead log: the working database is rebuilt from the last
/// checkpoint after any stop, so its own recovery is never used.
pub fn unlogged() -> rocksdb::WriteOptions {
    let mut options = rocksdb::WriteOptions::default();
    options.disable_wal(true);
    options
}

fn read_latest(dir: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(dir.join(LATEST)) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| std::io::Error::other(format!("{LATEST} holds `{}`", text.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `LATEST` atomically and durably: write a new file, sync it, rename it over
/// the old one, sync the directory.
fn write_latest(dir: &Path, id: u64) -> std::io::Result<()> {
    use std::io::Write;
    let temp = dir.join(format!("{LATEST}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    writeln!(file, "{id}")?;
    file.sync_all()?;
    std::fs::rename(&temp, dir.join(LATEST))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A working copy of a frozen checkpoint: table files are immutable, so they are hard
/// linked; the small files are copied.
fn restore_copy(frozen: &Path, working: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(working)?;
    for entry in std::fs::read_dir(frozen)? {
        let entry = entry?;
        let name = entry.file_name();
        let (from, to) = (entry.path(), working.join(&name));
        let is_table = name.to_string_lossy().ends_with(".sst");
        if !is_table || std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

fn remove_checkpoints_except(dir: &Path, keep: Option<u64>) {
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoints")) else {
        return;
    };
    let keep = keep.map(|id| id.to_string());
    for entry in entries.flatten() {
        if Some(entry.file_name().to_string_lossy().as_ref()) != keep.as_deref()
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an old checkpoint");
        }
    }
}

impl CheckpointStore for RocksStore {
    fn load(&self) -> Result<Checkpoint> {
        let mut checkpoint = Checkpoint::default();
        if let Some(id) = self.db.get(ID_KEY).map_err(|e| self.error(e))? {
            let bytes: [u8; 8] = id
                .as_slice()
                .try_into()
                .map_err(|_| self.error("bad checkpoint id"))?;
            checkpoint.id = u64::from_be_bytes(bytes);
        }
        for item in self.db.prefix_iterator(OFFSET_PREFIX.as_bytes()) {
            let (key, value) = item.map_err(|e| self.error(e))?;
            let Some(name) = key.strip_prefix(OFFSET_PREFIX.as_bytes()) else {
                break;
            };
            let bytes: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| self.error("bad offset value"))?;
            checkpoint.offsets.insert(
                String::from_utf8_lossy(name).into_owned(),
                i64::from_be_bytes(bytes),
            );
        }
        Ok(checkpoint)
    }

    fn commit(&self, checkpoint: &Checkpoint) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(ID_KEY, checkpoint.id.to_be_bytes());
        for (name, offset) in &checkpoint.offsets {
            batch.put(format!("{OFFSET_PREFIX}{name}"), offset.to_be_bytes());
        }
        self.db
            .write_opt(batch, &unlogged())
            .map_err(|e| self.error(e))?;
        // A scratch store keeps no checkpoints.
        if self.db.scratch.is_none() {
            self.freeze(checkpoint.id)?;
        }
        Ok(())
    }

    fn db(&self) -> Option<Arc<StateDb>> {
        Some(self.db.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same body for every store.
    fn store_contract(open: &dyn Fn() -> Box<dyn CheckpointStore>) {
        let store = open();
        assert_eq!(store.load().unwrap(), Checkpoint::default());
        let first = Checkpoint {
            id: 1,
            offsets: [("a.jsonl".to_string(), 10), ("generator/0".to_string(), 5)].into(),
        };
        store.commit(&first).unwrap();
        assert_eq!(store.load().unwrap(), first);
        // A later checkpoint replaces what it names and keeps the rest.
        store
            .commit(&Checkpoint {
                id: 2,
                offsets: [("a.jsonl".to_string(), 20)].into(),
            })
            .unwrap();
        let now = store.load().unwrap();
        assert_eq!(now.id, 2);
        assert_eq!(now.start_of("a.jsonl"), 20);
        assert_eq!(now.start_of("generator/0"), 5);
        assert_eq!(now.start_of("unknown"), 0);
    }

    #[test]
    fn memory_store() {
        let store = std::sync::Arc::new(MemoryStore::default());
        // One shared instance: "reopening" a memory store is looking at it again.
        struct Shared(std::sync::Arc<MemoryStore>);
        impl CheckpointStore for Shared {
            fn load(&self) -> Result<Checkpoint> {
                self.0.load()
            }
            fn commit(&self, c: &Checkpoint) -> Result<()> {
                self.0.commit(c)
            }
        }
        store_contract(&|| Box::new(Shared(store.clone())));
    }

    #[test]
    fn rocks_store_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        store_contract(&|| Box::new(RocksStore::open(dir.path()).unwrap()));
        // Reopened after the contract ran: the last checkpoint is still there.

        let reopened = RocksStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load().unwrap().id, 2);
    }

    #[test]
    fn state_written_after_the_last_checkpoint_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RocksStore::open(dir.path()).unwrap();
            let db = store.db().unwrap();
            db.put_opt(b"state/a", b"1", &unlogged()).unwrap();
            store
                .commit(&Checkpoint {
                    id: 1,
                    offsets: [("p".to_string(), 10)].into(),
                })
                .unwrap();
            // Written after the checkpoint, then the process "crashes" (no commit).
            db.put_opt(b"state/a", b"2", &unlogged()).unwrap();
            db.put_opt(b"state/b", b"3", &unlogged()).unwrap();
            db.put(b"offset/p", 99i64.to_be_bytes()).unwrap();
        }
        // A half-made checkpoint directory of the next id, as a crash mid-checkpoint leaves.
        std::fs::create_dir_all(dir.path().join("checkpoints/2")).unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let db = store.db().unwrap();
        assert_eq!(db.get(b"state/a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(db.get(b"state/b").unwrap(), None);
        assert_eq!(store.load().unwrap().start_of("p"), 10);
        assert!(!dir.path().join("checkpoints/2").exists());
        // The next checkpoint reuses the id the crash left half made.
        store
            .commit(&Checkpoint {
                id: 2,
                offsets: [("p".to_string(), 20)].into(),
            })
            .unwrap();
        drop((db, store));
        assert_eq!(
            RocksStore::open(dir.path())
                .unwrap()
                .load()
                .unwrap()
                .start_of("p"),
            20
        );
    }

    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = RocksStore::open(dir.path()).unwrap();
        let e = RocksStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("another process"), "{e}");
        drop(first);
        assert!(RocksStore::open(dir.path()).is_ok());
    }

    #[test]
    fn a_bare_database_of_the_old_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(rocksdb::DB::open_default(dir.path()).unwrap());
        let e = RocksStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("earlier Sluice"), "{e}");
    }
}
