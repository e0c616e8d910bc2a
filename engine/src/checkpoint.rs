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

use crate::state::PartitionKeys;
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

    /// For a store shared by several processes ([`RocksStore::open_member`]): copies into
    /// this process's database the state of each partition that another process committed
    /// at a later offset than this one has, with that offset; returns those offsets.
    fn take_over(&self, _partitions: &[(String, PartitionKeys)]) -> Result<BTreeMap<String, i64>> {
        Ok(BTreeMap::new())
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

/// Where a partition's next offset is kept.
fn offset_key(partition: &str) -> String {
    format!("{OFFSET_PREFIX}{partition}")
}

/// An offset as stored (8 bytes, big-endian).
fn decode_offset(value: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(value.try_into().ok()?))
}
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
            let offset = decode_offset(&value).ok_or_else(|| self.error("bad offset value"))?;
            checkpoint
                .offsets
                .insert(String::from_utf8_lossy(name).into_owned(), offset);
        }
        Ok(checkpoint)
    }

    fn commit(&self, checkpoint: &Checkpoint) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(ID_KEY, checkpoint.id.to_be_bytes());
        for (name, offset) in &checkpoint.offsets {
            batch.put(offset_key(name), offset.to_be_bytes());
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

/// A read-only copy of a member's last checkpoint: its files hard linked into a temporary
/// directory, so that the member may go on (and delete the checkpoint) while it is read.
struct FrozenCopy {
    db: rocksdb::DB,
    _dir: tempfile::TempDir,
}

impl FrozenCopy {
    fn open(root: &Path, member: &Path) -> std::io::Result<Option<FrozenCopy>> {
        // The member may replace its checkpoint while it is copied: try the new one.
        for _ in 0..10 {
            let Some(id) = read_latest(member)? else {
                return Ok(None);
            };
            let frozen = member.join("checkpoints").join(id.to_string());
            let dir = tempfile::Builder::new()
                .prefix(".takeover-")
                .tempdir_in(root)?;
            let copy = dir.path().join("db");
            if restore_copy(&frozen, &copy).is_err() {
                continue;
            }
            let db = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), &copy, false)
                .map_err(|e| std::io::Error::other(e.into_string()))?;
            return Ok(Some(FrozenCopy { db, _dir: dir }));
        }
        Err(std::io::Error::other(format!(
            "{} changed its checkpoint 10 times while it was read",
            member.display()
        )))
    }
}

/// Replaces, in `batch` for database `own`, the partition's state with what `from` holds.
fn copy_partition(
    own: &rocksdb::DB,
    from: &rocksdb::DB,
    name: &str,
    keys: &PartitionKeys,
    offset: i64,
    batch: &mut rocksdb::WriteBatch,
) -> std::result::Result<(), rocksdb::Error> {
    for prefix in &keys.prefixes {
        for item in own.iterator(rocksdb::IteratorMode::From(
            prefix,
            rocksdb::Direction::Forward,
        )) {
            let (key, _) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            batch.delete(&key);
        }
        for item in from.iterator(rocksdb::IteratorMode::From(
            prefix,
            rocksdb::Direction::Forward,
        )) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            batch.put(&key, &value);
        }
    }
    for key in &keys.keys {
        match from.get(key)? {
            Some(value) => batch.put(key, value),
            None => batch.delete(key),
        }
    }
    batch.put(offset_key(name), offset.to_be_bytes());
    Ok(())
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

    /// A member writing state for a partition (keys under `s/NAME/`) and committing it.
    fn commit_state(store: &RocksStore, id: u64, name: &str, offset: i64, values: &[(&str, &str)]) {
        let db = store.db().unwrap();
        for (k, v) in values {
            db.put(format!("s/{name}/{k}"), v).unwrap();
        }
        db.put(format!("m/{name}"), format!("meta@{offset}"))
            .unwrap();
        store
            .commit(&Checkpoint {
                id,
                offsets: [(name.to_string(), offset)].into(),
            })
            .unwrap();
    }

    fn keys(name: &str) -> PartitionKeys {
        PartitionKeys {
            prefixes: vec![format!("s/{name}/").into_bytes()],
            keys: vec![format!("m/{name}").into_bytes()],
        }
    }

    fn state_of(store: &RocksStore, name: &str) -> Vec<(String, String)> {
        let db = store.db().unwrap();
        let prefix = format!("s/{name}/");
        let mut out: Vec<(String, String)> = db
            .prefix_iterator(prefix.as_bytes())
            .map(|i| i.unwrap())
            .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
            .map(|(k, v)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect();
        if let Some(m) = db.get(format!("m/{name}")).unwrap() {
            out.push(("meta".into(), String::from_utf8(m).unwrap()));
        }
        out
    }

    #[test]
    fn a_member_takes_over_the_newest_state_of_a_partition() {
        let root = tempfile::tempdir().unwrap();
        let a = RocksStore::open_member(root.path(), "a").unwrap();
        let b = RocksStore::open_member(root.path(), "b").unwrap();
        let c = RocksStore::open_member(root.path(), "c").unwrap();
        // p1: a had it up to 100, then c up to 250 (newest). p2: only b, at 40.
        commit_state(&a, 1, "p1", 100, &[("x", "1"), ("y", "1")]);
        commit_state(&c, 1, "p1", 250, &[("x", "5")]);
        commit_state(&b, 1, "p2", 40, &[("z", "9")]);
        // b's own older copy of p1 (it had p1 once, at 50): replaced, key by key.
        commit_state(&b, 2, "p1", 50, &[("old", "0")]);
        let taken = b
            .take_over(&[("p1".into(), keys("p1")), ("p2".into(), keys("p2"))])
            .unwrap();
        assert_eq!(
            taken,
            [("p1".to_string(), 250)].into(),
            "p2 is b's own newest"
        );
        assert_eq!(
            state_of(&b, "p1"),
            vec![
                ("s/p1/x".into(), "5".into()),
                ("meta".into(), "meta@250".into())
            ]
        );
        assert_eq!(
            state_of(&b, "p2"),
            vec![
                ("s/p2/z".into(), "9".into()),
                ("meta".into(), "meta@40".into())
            ]
        );
        assert_eq!(b.load().unwrap().start_of("p1"), 250);
        // Taking over again finds nothing newer.
        assert!(
            b.take_over(&[("p1".into(), keys("p1"))])
                .unwrap()
                .is_empty()
        );
        // A store that is no member takes nothing over.
        let single = tempfile::tempdir().unwrap();
        let alone = RocksStore::open(single.path()).unwrap();
        assert!(
            alone
                .take_over(&[("p1".into(), keys("p1"))])
                .unwrap()
                .is_empty()
        );
        // A shared directory is not opened as a single process's.
        let e = RocksStore::open(root.path()).err().unwrap().to_string();
        assert!(e.contains("shared by worker processes"), "{e}");
    }

    #[test]
    fn a_member_takes_over_from_the_directorys_earlier_single_process_store() {
        let root = tempfile::tempdir().unwrap();
        {
            let single = RocksStore::open(root.path()).unwrap();
            commit_state(&single, 1, "p1", 70, &[("x", "7")]);
        }
        let a = RocksStore::open_member(root.path(), "a").unwrap();
        assert_eq!(
            a.take_over(&[("p1".into(), keys("p1"))]).unwrap(),
            [("p1".to_string(), 70)].into()
        );
        assert_eq!(state_of(&a, "p1")[0], ("s/p1/x".into(), "7".into()));
        assert!(RocksStore::open_member(root.path(), "../x").is_err());
    }
}
