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
use std::path::Path;
use std::sync::Mutex;

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
    /// partitions keep theirs. Durable when it returns.
    fn commit(&self, checkpoint: &Checkpoint) -> Result<()>;
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

/// Checkpoints in a RocksDB database in a directory of their own.
pub struct RocksStore {
    db: rocksdb::DB,
    path: std::path::PathBuf,
}

impl RocksStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, dir).map_err(|e| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: e.into_string(),
        })?;
        Ok(RocksStore {
            db,
            path: dir.to_path_buf(),
        })
    }

    fn error(&self, e: impl ToString) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            message: e.to_string(),
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
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|e| self.error(e))
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
}
