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
//!
//! # Where things are
//! Here: the checkpoint, the store's contract, the stores and how a checkpoint is
//! committed. `files.rs`: the directory layout (`checkpoints/<id>`, `LATEST`, `FALLBACK`)
//! and rebuilding the working database from it. `takeover.rs`: copying a partition's
//! state out of another member's last checkpoint. `tests.rs`: the stores' tests.
//! # Stores
//! [`RocksStore`] is the real store. [`MemoryStore`] serves tests; both pass the same tests.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::source::ResumeAt;
use crate::state::PartitionKeys;
use crate::{Error, Result};

mod files;
mod takeover;

use files::*;
use takeover::*;

/// Per partition name, the next offset to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Increases by one with every committed checkpoint; 0 when nothing was committed.
    pub id: u64,
    pub offsets: BTreeMap<String, i64>,
    /// Per partition name, the source's own position, for sources whose positions are not
    /// numbers (a Kinesis shard's sequence number): text the source wrote with an offset
    /// ([`crate::source::PositionBook`]) and reads back to resume. Committed with the
    /// offsets, atomically; a partition keeps its last one when a checkpoint has none.
    pub positions: BTreeMap<String, String>,
    /// Restored in place of a later checkpoint that was lost (see [`RocksStore`]'s power
    /// failures): offsets committed elsewhere since (a Kafka group's) are ahead of this
    /// checkpoint's state, so sources start exactly at its offsets until the next commit.
    pub fallback: bool,
}

impl Checkpoint {
    /// Where `partition` starts: its next offset, or 0.
    pub fn start_of(&self, partition: &str) -> i64 {
        self.offsets.get(partition).copied().unwrap_or(0)
    }

    /// Where `partition` resumes: its offset and position, when it has an offset.
    pub fn resume_at(&self, partition: &str) -> Option<ResumeAt> {
        Some(ResumeAt {
            offset: *self.offsets.get(partition)?,
            position: self.positions.get(partition).cloned(),
        })
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

    /// For a store shared by several processes ([`RocksStore::open_member`]): copies into
    /// this process's database the state of each partition that another process committed
    /// at a later offset than this one has, with that offset; returns those offsets.
    fn take_over(&self, _partitions: &[(String, PartitionKeys)]) -> Result<BTreeMap<String, i64>> {
        Ok(BTreeMap::new())
    }

    /// Where this process's database has `partition` now (its last commit, or a
    /// [`CheckpointStore::take_over`] since): its offset and position.
    fn resume_at(&self, _partition: &str) -> Result<Option<ResumeAt>> {
        Ok(None)
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
        for (k, v) in &checkpoint.positions {
            current.positions.insert(k.clone(), v.clone());
        }
        Ok(())
    }
}

const ID_KEY: &[u8] = b"meta/checkpoint_id";
const OFFSET_PREFIX: &str = "offset/";
const POSITION_PREFIX: &str = "position/";

/// Where a partition's next offset is kept.
fn offset_key(partition: &str) -> String {
    format!("{OFFSET_PREFIX}{partition}")
}

/// Where a partition's source position is kept (see [`Checkpoint::positions`]).
fn position_key(partition: &str) -> String {
    format!("{POSITION_PREFIX}{partition}")
}

/// An offset as stored (8 bytes, big-endian).
fn decode_offset(value: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(value.try_into().ok()?))
}
const WRITE_BUFFER_BYTES: usize = 16 << 20;
const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// The file naming the last complete checkpoint, in the store's directory.
const LATEST: &str = "LATEST";
/// How many times a take-over copies a member's checkpoint when the member changes its
/// checkpoints under the copy.
const COPY_ATTEMPTS: usize = 10;
/// The directories take-overs copy other members' checkpoints into, in the shared directory.
const TAKEOVER_PREFIX: &str = ".takeover-";
/// A take-over directory without its lock file is a leftover once it is this old (see
/// [`remove_takeover_leftovers`]).
const UNLOCKED_TAKEOVER_AGE: Duration = Duration::from_secs(60);

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
///
/// # Power failures
/// A checkpoint's files, its directory and its entry in `checkpoints/` are synced before
/// `LATEST` names it, and `LATEST` is replaced durably: after a power failure, `LATEST`
/// names a checkpoint that is on disk. The checkpoint before the latest stays until the
/// next one is complete, for the failures syncing does not prevent (a disk that lost a
/// synced write, a damaged file, `LATEST` itself garbage): when the latest checkpoint is
/// missing or unreadable, opening restores the one before it, says so in a warning, and
/// names it in `LATEST` again. That reads one checkpoint interval of records again and
/// loses none: every checkpoint was taken after the sink had been flushed. Until the next
/// commit, a `FALLBACK` file names the restored checkpoint, also across further restarts,
/// and [`Checkpoint::fallback`] tells sources to start at its offsets rather than at a
/// consumer group's (which the lost checkpoint had moved on, past state this one lacks).
pub struct RocksStore {
    db: Arc<StateDb>,
    dir: PathBuf,
    /// Restored in place of a lost checkpoint: the partitions of the restored checkpoint
    /// that no commit has covered since.
    fallback: std::sync::Mutex<Option<std::collections::BTreeSet<String>>>,
    /// Set for one member of a directory shared by worker processes.
    member: Option<Member>,
    /// Held while the store is open: a second process on the same directory would clear
    /// this one's working database.
    _lock: std::fs::File,
}

/// A process's place in a checkpoint directory shared by worker processes.
struct Member {
    /// The shared directory.
    root: PathBuf,
    name: String,
}

/// Where the members of a shared checkpoint directory keep their stores.
const MEMBERS: &str = "members";

impl RocksStore {
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.join(MEMBERS).is_dir() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!(
                    "this checkpoint directory is shared by worker processes (it has `{MEMBERS}/`): \
                     run the pipeline with `sluice worker` or `sluice run --processes`, or give it a new directory"
                ),
            });
        }
        Self::open_in(dir, None)
    }

    /// The store of worker process `member` in the shared directory `root`
    /// (`root/members/MEMBER`). Partitions move between members with their state: see
    /// [`CheckpointStore::take_over`].
    pub fn open_member(root: &Path, member: &str) -> Result<Self> {
        let valid = !member.is_empty()
            && member
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !member.starts_with('.');
        if !valid {
            return Err(Error::Checkpoint {
                path: root.to_path_buf(),
                message: format!(
                    "member name `{member}`: use letters, digits, `-`, `_` and `.` (it names a directory)"
                ),
            });
        }
        let mut store = Self::open_in(&root.join(MEMBERS).join(member), None)?;
        remove_takeover_leftovers(root);
        store.member = Some(Member {
            root: root.to_path_buf(),
            name: member.to_string(),
        });
        Ok(store)
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
        let (db, restored) = restore(dir, &working).map_err(error)?;
        // Checkpoints other than the restored one and the one before it are leftovers: of a
        // crash mid-checkpoint, or unreadable ones that opening fell back from.
        remove_checkpoints_except(dir, restored);
        let fallback = (restored.is_some() && read_id(&dir.join(FALLBACK)) == restored)
            .then(|| read_checkpoint(&db).map(|c| c.offsets.into_keys().collect()))
            .transpose()
            .map_err(error)?;
        Ok(RocksStore {
            db: Arc::new(StateDb { db, scratch }),
            dir: dir.to_path_buf(),
            fallback: fallback.into(),
            member: None,
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
        // On disk before `LATEST` names it. RocksDB syncs the checkpoint's directory but not
        // `checkpoints/`, where the rename from its staging name put its entry; a power
        // failure could take the entry and leave `LATEST` naming nothing.
        sync_checkpoint(&target)
            .map_err(|e| self.error(format!("cannot sync checkpoint {id}: {e}")))?;
        write_latest(&self.dir, id).map_err(|e| self.error(e))?;
        // The checkpoint before this one stays, for opening to fall back to should this one
        // be found unreadable; it goes once the next one is complete.
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

/// The working database's options.
fn db_options() -> rocksdb::Options {
    let mut options = rocksdb::Options::default();
    // Memory the store itself may take, on top of the stages' state budgets: two write
    // buffers and the block cache (stated in docs/aggregation.md).
    options.set_write_buffer_size(WRITE_BUFFER_BYTES);
    options.set_max_write_buffer_number(2);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    // Lookups of keys that were never written are the common miss: Bloom filters. Indexes
    // and filters held whole beside each table grow with the stored keys (about 2 bytes a
    // key: 20 MiB at 10 million) outside any bound, so they are partitioned and kept in the
    // block cache at high priority, only their top levels pinned: the store's memory stays
    // the write buffers plus the cache (10 million keys at a 32 MiB budget peaked 15 MiB
    // lower, Nexmark q11 at 100M events 60 MiB lower, at the same speed).
    table.set_bloom_filter(10.0, false);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    options.set_block_based_table_factory(&table);
    options
}

impl CheckpointStore for RocksStore {
    fn load(&self) -> Result<Checkpoint> {
        let mut checkpoint = read_checkpoint(&self.db).map_err(|e| self.error(e))?;
        checkpoint.fallback = self.fallback.lock().expect("fallback lock").is_some();
        Ok(checkpoint)
    }

    fn commit(&self, checkpoint: &Checkpoint) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(ID_KEY, checkpoint.id.to_be_bytes());
        for (name, offset) in &checkpoint.offsets {
            batch.put(offset_key(name), offset.to_be_bytes());
        }
        for (name, position) in &checkpoint.positions {
            batch.put(position_key(name), position.as_bytes());
        }
        self.db
            .write_opt(batch, &unlogged())
            .map_err(|e| self.error(e))?;
        // A scratch store keeps no checkpoints.
        if self.db.scratch.is_none() {
            self.freeze(checkpoint.id)?;
        }
        // Commits after a fallback move the group on from the restored offsets; once every
        // restored partition has been committed, the group's offsets are this store's again.
        let mut fallback = self.fallback.lock().expect("fallback lock");
        if let Some(pending) = fallback.as_mut() {
            pending.retain(|p| !checkpoint.offsets.contains_key(p));
            if pending.is_empty() {
                *fallback = None;
                let _ = std::fs::remove_file(self.dir.join(FALLBACK));
            }
        }
        Ok(())
    }

    fn db(&self) -> Option<Arc<StateDb>> {
        Some(self.db.clone())
    }

    fn resume_at(&self, partition: &str) -> Result<Option<ResumeAt>> {
        let read = |key: String| self.db.get(key).map_err(|e| self.error(e));
        let Some(offset) = read(offset_key(partition))?
            .as_deref()
            .and_then(decode_offset)
        else {
            return Ok(None);
        };
        let position =
            read(position_key(partition))?.map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(Some(ResumeAt { offset, position }))
    }

    fn take_over(&self, partitions: &[(String, PartitionKeys)]) -> Result<BTreeMap<String, i64>> {
        let Some(member) = &self.member else {
            return Ok(BTreeMap::new());
        };
        let offset_of = |db: &rocksdb::DB, name: &str| -> Result<Option<i64>> {
            let value = db.get(offset_key(name)).map_err(|e| self.error(e))?;
            Ok(value.as_deref().and_then(decode_offset))
        };
        // Per partition: the newest offset found, and the copy holding it (`None`: this
        // member's own).
        let mut best: BTreeMap<&str, (Option<usize>, i64)> = BTreeMap::new();
        for (name, _) in partitions {
            if let Some(own) = offset_of(&self.db, name)? {
                best.insert(name, (None, own));
            }
        }
        // Every other member's last checkpoint (and a single-process store the directory
        // held before it was shared): the one with the highest offset for a partition
        // holds its newest state, since a partition's offset only grows from owner to owner.
        let mut others: Vec<PathBuf> = std::fs::read_dir(member.root.join(MEMBERS))
            .map_err(|e| self.error(format!("cannot list the members: {e}")))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy() != member.name.as_str())
            .map(|e| e.path())
            .collect();
        others.push(member.root.clone());
        let mut copies = Vec::new();
        for other in others {
            let Some(frozen) = FrozenCopy::open(&member.root, &other).map_err(|e| self.error(e))?
            else {
                continue;
            };
            for (name, _) in partitions {
                let Some(offset) = offset_of(&frozen.db, name)? else {
                    continue;
                };
                if best.get(name.as_str()).is_some_and(|(_, o)| *o >= offset) {
                    continue;
                }
                best.insert(name, (Some(copies.len()), offset));
            }
            copies.push((other, frozen));
        }
        let mut taken: BTreeMap<String, i64> = BTreeMap::new();
        let mut batch = rocksdb::WriteBatch::default();
        for (name, keys) in partitions {
            let Some(&(Some(copy), offset)) = best.get(name.as_str()) else {
                continue;
            };
            let (from, frozen) = &copies[copy];
            copy_partition(&self.db, &frozen.db, name, keys, offset, &mut batch)
                .map_err(|e| self.error(e))?;
            taken.insert(name.clone(), offset);
            tracing::info!(partition = %name, offset, from = %from.display(), "taking over the partition's state");
        }
        if !taken.is_empty() {
            self.db
                .write_opt(batch, &unlogged())
                .map_err(|e| self.error(e))?;
        }
        Ok(taken)
    }
}

#[cfg(test)]
mod tests;
