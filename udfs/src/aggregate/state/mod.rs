//! The state of an aggregate stage: per source partition, open windows of accumulators by
//! key, in memory up to a budget and in RocksDB beyond it.
//!
//! # Watermarks and lateness
//! A partition's watermark is the largest event time it has shown minus
//! `allowed_lateness`, advanced row by row, so which rows are late depends only on the
//! partition's own order of records: a replay after a crash decides exactly as the first
//! run did. A row is late when every window it belongs to has closed: its end is at or
//! behind the partition's watermark, or behind what was emitted of the partition. Each
//! partition keeps its own emitted mark (in its checkpointed progress), so a partition that
//! was elsewhere while the others emitted (another process, or released and assigned again)
//! is judged by its own progress: with keys that live in one partition, its windows come
//! out complete after any number of moves. The stage's watermark is the minimum over the
//! partitions this process reads, leaving out idle ones (no data for `idle_timeout` and
//! nothing waiting; when all are idle, the largest of theirs) and counting ended ones
//! (bounded sources) as done. It is looked at after every batch and every second (windows
//! close with time too: a partition going idle, state taken over where no batch follows);
//! the windows of each partition whose end it passes and that the partition has not
//! emitted are emitted, with the partial results of every partition merged into one row
//! per key and window. Each partition keeps the earliest watermark at which something of
//! it would close (`Part::due_at`), so a look that closes nothing locks no partition.
//!
//! # Panes
//! Tumbling and sliding windows are kept as panes of one slide each (a tumbling window is
//! one pane): a row updates the one pane it falls in, not every window that holds it, and a
//! key's state is kept once, not once per window. A window is emitted as the merge of its
//! panes (`size / slide` of them); a pane leaves the state with its last window.
//!
//! # Memory and storage
//! Each partition's open panes are tables of row-encoded keys and their accumulators
//! (`table.rs`: keys in byte blocks, accumulators in fixed chunks, a hash index of entry
//! numbers; no allocation per entry). When
//! the stage's memory passes its budget, the partition being processed writes its oldest
//! windows' entries to the checkpoint store's database (changed ones; unchanged ones are
//! there already) and drops them; a later row of an evicted key reads it back. At a
//! checkpoint every changed entry and each partition's progress (largest event time, row
//! sequence) are written, and the store freezes them with the offsets. Closing windows are
//! read back in key order and merged across partitions in chunks, so emitting a window
//! larger than memory needs no more memory than a chunk.
//!
//! # Keys in the database
//! ```text
//! agg/<stage>/m/<partition>                         partition progress
//! agg/<stage>/w/<len><partition><end><key>          pane entry (end: order-preserving)
//! agg/<stage>/s/<len><partition><key>               the key's sessions
//! agg/<stage>/e/<len><partition><end><key>          an end marker of the key's sessions
//! ```
//!
//! # Where things are
//! Here: the plan, the partitions' progress, adding rows, the watermark. `due.rs`: which
//! windows are due and taking them out of the partitions. `closing.rs`: closed windows
//! read out in key order, merged across partitions.
//! `table.rs`: a pane's entries. `sessions/`: session windows, in memory and in the
//! database, and merged across partitions. `storage.rs`: eviction
//! and checkpoint writes of a partition's state. `lifecycle.rs`: the engine's handle
//! (restore, assign, revoke, release, take-over, snapshot, a partition's end).

use std::cmp::Ordering as Cmp;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use arrow::array::{Array, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use arrow::row::RowConverter;
use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use rocksdb::{DB, WriteBatch};
use sluice_engine::batch::PartitionInfo;
use sluice_engine::checkpoint::{StateDb, unlogged};
use sluice_engine::state::{PartitionKeys, SnapshotStats, StageState};
use sluice_engine::stats::PartitionLag;
use sluice_engine::{Error, Result};

use super::acc::{self, Acc, AggDef, Input, Order};

mod closing;
mod due;
mod lifecycle;
mod merged;
#[cfg(test)]
mod recount;
mod sessions;
mod storage;
mod table;

pub use closing::{Closing, OutRow};
use closing::{Frozen, SessionRow, StoredRange, prefix_end, read_range};
use merged::{MergedPane, PaneOut};
use sessions::{Sessions, StoredSessions, merge_all_sessions, merge_sessions, write_all_sessions};
use table::{KeyOrder, PaneTable, Table, order_bytes};

/// How rows are assigned to windows (times in milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Tumbling {
        size: i64,
    },
    /// `size` is a multiple of `slide`.
    Sliding {
        size: i64,
        slide: i64,
    },
    Session {
        gap: i64,
    },
}

/// Everything about the stage that does not change while it runs.
pub struct Plan {
    pub stage: Arc<str>,
    pub group_by: Vec<usize>,
    pub converter: RowConverter,
    pub event_time: usize,
    pub window: WindowKind,
    pub lateness: i64,
    pub idle_timeout: i64,
    /// How far ahead of the clock an event time may be, in ms.
    pub max_skew: i64,
    pub aggs: Vec<AggDef>,
    pub budget: usize,
    pub output: SchemaRef,
}

/// Rows per emitted batch.
const CHUNK: usize = 64 * 1024;
/// A snapshot or eviction writes the database in batches of about this size.
const WRITE_BATCH_BYTES: usize = 4 << 20;

/// `Part::continued`: the partition has not ended so (or not at all).
const NOT_CONTINUED: u8 = 0;
/// Ended, its successors not assigned yet: it holds the stage watermark at its own (never
/// idle), so that no window open at its end closes before they hold it back themselves.
const AWAITING_SUCCESSORS: u8 = 1;
/// Ended, and a successor has been assigned here: it no longer counts in the stage
/// watermark, and its open windows close, merged with its successors', when that passes.
const SUCCEEDED: u8 = 2;

pub struct AggregateState {
    pub plan: Plan,
    db: OnceLock<Arc<StateDb>>,
    parts: RwLock<BTreeMap<Arc<str>, Arc<Part>>>,
    /// Held while windows are taken out of the partitions to be emitted.
    emission: Mutex<()>,
    /// Panes merged across partitions for their later windows, by pane end.
    merged: Mutex<BTreeMap<i64, MergedPane>>,
    memory: AtomicI64,
    epoch: Instant,
    pub late_dropped: AtomicU64,
    /// Entries written out of memory to make room.
    pub evicted: AtomicU64,
    /// Some accumulator's size changes with the values it sees (distinct sets, text).
    variable_size: bool,
    /// Partitions a partition assigned here continues (see `StageState::follows`).
    followed: Mutex<std::collections::HashSet<Arc<str>>>,
}

struct Part {
    id: AtomicU32,
    /// Largest event time minus the allowed lateness; `i64::MIN` before any data and
    /// `i64::MAX` once the partition has ended.
    watermark: AtomicI64,
    /// This partition's windows ending at or before this have been emitted. Its own: a
    /// partition that was elsewhere (another process, or released and assigned again)
    /// while the others emitted is judged by its own progress, not theirs.
    emitted: AtomicI64,
    /// Loaded from the checkpoint at start-up and not assigned since: it holds the
    /// watermark back (until idle) so that windows are not emitted without it before it is
    /// assigned, but nothing of it is emitted or read, since another process may own it.
    restored: AtomicBool,
    /// The smallest stage watermark at which something of this partition would close: its
    /// first pane's end, or just past its earliest session end marker (a lower bound of
    /// its sessions' ends); `i64::MAX` when it holds nothing. Set under its state lock, so
    /// a watermark check needs no lock when nothing is due (see `AggregateState::due`).
    due_at: AtomicI64,
    /// Milliseconds since `AggregateState::epoch` of the last batch.
    last_data: AtomicI64,
    /// The pipeline's position in the partition and its end, when the source can tell:
    /// a partition with records not done yet is never idle.
    lag: Mutex<Option<Arc<PartitionLag>>>,
    active: AtomicBool,
    /// Revoked and not assigned again since: the release after its drain may drop it.
    revoked: AtomicBool,
    /// Ended, its records going on in partitions read next here (a Kinesis shard's
    /// children): [`NOT_CONTINUED`], [`AWAITING_SUCCESSORS`] or [`SUCCEEDED`].
    continued: AtomicU8,
    state: Mutex<PartState>,
}

impl Part {
    /// Loaded from the checkpoint and not assigned here since (see `restored`).
    fn restored_unassigned(&self) -> bool {
        self.restored.load(Ordering::Acquire) && !self.active.load(Ordering::Acquire)
    }
}

struct PartState {
    prefix: Vec<u8>,
    meta_key: Vec<u8>,
    max_time: i64,
    seq: u64,
    windows: BTreeMap<i64, Window>,
    /// Entries of the last pane this partition emitted whole: a pane that fills gets an
    /// index that large (one that grows from empty rehashes its keys at each doubling,
    /// reading each again: with 8 partitions' copies of Nexmark q5's auctions, 4% of the
    /// time).
    pane_hint: usize,
    sessions: Sessions,
    mem: usize,
    meta_dirty: bool,
}

#[derive(Default)]
struct Window {
    entries: PaneTable,
    /// Some entries of this window are in the database and not in memory.
    evicted: bool,
    /// The database may hold entries of this window.
    stored: bool,
    /// The keys this process evicted, so that a key never seen before (the common miss)
    /// costs no database lookup.
    filter: KeyFilter,
    /// Restored from a checkpoint: any key may be in the database.
    restored: bool,
    /// The entries in key order, when an emission sorted them and none was added or moved
    /// since: a sliding window's pane is in `size / slide` emissions, and each sorted it
    /// again. Counted in the partition's memory.
    order: Option<KeyOrder>,
}

/// Whether an evicted window's database entries may hold `key` (its fields apart: the
/// caller holds its map's entry).
fn may_be_stored(filter: &KeyFilter, evicted: bool, restored: bool, key: &[u8]) -> bool {
    evicted && (restored || filter.may_contain(key))
}

/// A growing Bloom filter: a list of filters of doubling capacity at ~1% false positives
/// (10 bits and 7 probes per key).
#[derive(Default)]
struct KeyFilter {
    parts: Vec<(Vec<u64>, usize, usize)>,
}

impl KeyFilter {
    const PROBES: u64 = 7;

    /// The key's two hashes: probe `i` is at `a + i * b`.
    fn hash(key: &[u8]) -> (u64, u64) {
        let h = xxhash_rust::xxh3::xxh3_128(key);
        (h as u64, (h >> 64) as u64 | 1)
    }

    fn probes((a, b): (u64, u64), bits: usize) -> impl Iterator<Item = usize> {
        (0..Self::PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % bits as u64) as usize)
    }

    fn insert(&mut self, key: &[u8]) -> usize {
        let mut grown = 0;
        let full = self.parts.last().is_none_or(|(_, cap, n)| n >= cap);
        if full {
            let cap = self.parts.last().map_or(256, |p| p.1 * 2);
            let words = (cap * 10).div_ceil(64);
            self.parts.push((vec![0; words], cap, 0));
            grown = words * 8;
        }
        let (bits, _, n) = self.parts.last_mut().expect("a filter");
        let len = bits.len() * 64;
        for i in Self::probes(Self::hash(key), len) {
            bits[i / 64] |= 1 << (i % 64);
        }
        *n += 1;
        grown
    }

    /// Hashes the key once for all the filters.
    fn may_contain(&self, key: &[u8]) -> bool {
        if self.parts.is_empty() {
            return false;
        }
        let hash = Self::hash(key);
        self.parts.iter().any(|(bits, _, _)| {
            let len = bits.len() * 64;
            Self::probes(hash, len).all(|i| bits[i / 64] & (1 << (i % 64)) != 0)
        })
    }

    fn size(&self) -> usize {
        self.parts.iter().map(|p| p.0.len() * 8).sum()
    }

    /// The keys inserted.
    fn len(&self) -> usize {
        self.parts.iter().map(|p| p.2).sum()
    }
}

/// Big-endian with the sign bit flipped: byte order is numeric order.
fn ordered(x: i64) -> [u8; 8] {
    ((x as u64) ^ (1 << 63)).to_be_bytes()
}

fn unordered(b: &[u8]) -> i64 {
    (u64::from_be_bytes(b[..8].try_into().expect("8 bytes")) ^ (1 << 63)) as i64
}

/// A state-store fault stops the run (class internal) rather than being retried with the
/// batch: a half-applied write must not be applied twice; the restart restores the last
/// checkpoint, so no record is lost.
fn db_error(e: rocksdb::Error) -> Error {
    Error::Internal(format!("aggregate state store: {e}"))
}

impl AggregateState {
    pub fn new(plan: Plan) -> Self {
        AggregateState {
            db: OnceLock::new(),
            parts: RwLock::new(BTreeMap::new()),
            emission: Mutex::new(()),
            merged: Mutex::default(),
            memory: AtomicI64::new(0),
            epoch: Instant::now(),
            late_dropped: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            variable_size: plan.aggs.iter().any(AggDef::variable_size),
            followed: Mutex::default(),
            plan,
        }
    }

    fn now(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    fn key_prefix(&self, space: u8, partition: &str) -> Vec<u8> {
        let mut k = format!("agg/{}/", self.plan.stage).into_bytes();
        k.push(space);
        k.push(b'/');
        if space != b'm' {
            k.extend_from_slice(&(partition.len() as u16).to_be_bytes());
        }
        k.extend_from_slice(partition.as_bytes());
        k
    }

    fn part(&self, info: &PartitionInfo) -> Arc<Part> {
        if let Some(p) = self.parts.read().expect("parts lock").get(&info.name) {
            return p.clone();
        }
        let mut parts = self.parts.write().expect("parts lock");
        parts
            .entry(info.name.clone())
            .or_insert_with(|| Arc::new(self.new_part(&info.name, info.id)))
            .clone()
    }

    fn new_part(&self, name: &Arc<str>, id: u32) -> Part {
        Part {
            id: AtomicU32::new(id),
            watermark: AtomicI64::new(i64::MIN),
            emitted: AtomicI64::new(i64::MIN),
            restored: AtomicBool::new(false),
            due_at: AtomicI64::new(i64::MAX),
            last_data: AtomicI64::new(self.now()),
            lag: Mutex::new(None),
            active: AtomicBool::new(true),
            revoked: AtomicBool::new(false),
            continued: AtomicU8::new(NOT_CONTINUED),
            state: Mutex::new(PartState {
                prefix: self.key_prefix(b'w', name),
                meta_key: self.key_prefix(b'm', name),
                max_time: i64::MIN,
                seq: 0,
                windows: BTreeMap::new(),
                pane_hint: 0,
                sessions: Sessions::new(
                    self.key_prefix(b's', name),
                    self.key_prefix(b'e', name),
                    sessions::Shape::of(&self.plan.aggs),
                ),
                mem: 0,
                meta_dirty: false,
            }),
        }
    }

    fn watermark_of(&self, max_time: i64) -> i64 {
        if max_time == i64::MIN {
            i64::MIN
        } else {
            max_time.saturating_sub(self.plan.lateness)
        }
    }

    /// Adds a batch of `partition`'s rows. Returns the rows that are late (every window
    /// they belong to has closed) and the rows without an event time.
    pub fn add(
        &self,
        partition: &PartitionInfo,
        batch: &RecordBatch,
        times: &TimestampMillisecondArray,
        keys: Option<&arrow::row::Rows>,
        inputs: &[acc::Cast],
    ) -> Result<Added> {
        let part = self.part(partition);
        part.id.store(partition.id, Ordering::Relaxed);
        part.restored.store(false, Ordering::Release);
        part.active.store(true, Ordering::Release);
        let views: Vec<Input> = inputs.iter().map(acc::input_view).collect();
        let db = self.db.get().map(|d| &***d);
        let mut added = Added::default();
        // Ties of first/last between partitions go by the partition's name, which stays the
        // same across restarts (an index may not).
        let rank = xxhash_rust::xxh3::xxh3_64(partition.name.as_bytes()) as u32;
        // Event times the window arithmetic and the watermark can take: from the year 0 to
        // `max_skew` ahead of the clock (and never past the year 9999).
        let clock = sluice_engine::dead_letter::now_ms();
        let valid = FIRST_TIME..=clock.saturating_add(self.plan.max_skew).min(LAST_TIME);
        let mut st = part.state.lock().expect("partition lock");
        let st = &mut *st;
        let emitted = part.emitted.load(Ordering::Acquire);
        let mem_before = st.mem;
        for row in 0..batch.num_rows() {
            if times.is_null(row) {
                added.no_time.push(row);
                continue;
            }
            let time = times.value(row);
            if !valid.contains(&time) {
                added.out_of_range.push((row, time));
                continue;
            }
            let key: &[u8] = match keys {
                Some(keys) => keys.row(row).data(),
                None => &[],
            };
            // Emissions take this partition's lock: what it emitted is fixed meanwhile.
            let closed = self.watermark_of(st.max_time).max(emitted);
            let order = Order {
                time,
                partition: rank,
                seq: st.seq,
            };
            st.seq += 1;
            let taken = match self.plan.window {
                WindowKind::Tumbling { size: slide, .. } | WindowKind::Sliding { slide, .. } => {
                    // One update, to the row's pane; taken while a window holding it is open.
                    let pane = time.div_euclid(slide) * slide + slide;
                    self.last_window_of(pane) > closed && {
                        self.update(st, db, pane, key, &views, row, order)?;
                        true
                    }
                }
                WindowKind::Session { gap } => st.sessions.add(
                    db,
                    key,
                    (time, time.saturating_add(gap), closed),
                    &self.plan.aggs,
                    &views,
                    row,
                    order,
                    &mut st.mem,
                )?,
            };
            if !taken {
                added.late.push((row, time, closed));
            }
            st.max_time = st.max_time.max(time);
        }
        st.meta_dirty = true;
        self.set_due(&part, st, emitted);
        part.watermark
            .store(self.watermark_of(st.max_time), Ordering::Release);
        part.last_data.store(self.now(), Ordering::Relaxed);
        self.account(mem_before, st.mem);
        if let Some(db) = db {
            self.make_room(db, &mut [st], &[emitted])?;
        }
        Ok(added)
    }

    /// Counts a partition's memory going from `before` to `after` in the stage's total.
    fn account(&self, before: usize, after: usize) {
        self.memory
            .fetch_add(after as i64 - before as i64, Ordering::Relaxed);
    }

    /// When the stage's memory is past its budget, writes state of `states` (each with what
    /// its partition has emitted) to the database, down to 80% of the budget: from the
    /// partition being processed after a batch, from those that read sessions back after
    /// an emission. Panes merged across partitions go first: they are copies.
    fn make_room(&self, db: &DB, states: &mut [&mut PartState], emitted: &[i64]) -> Result<()> {
        if self.memory.load(Ordering::Relaxed) > self.plan.budget as i64 {
            self.forget_all_merged();
        }
        for (st, &emitted) in states.iter_mut().zip(emitted) {
            let total = self.memory.load(Ordering::Relaxed);
            if total <= self.plan.budget as i64 {
                break;
            }
            let excess = total as usize - self.plan.budget * 4 / 5;
            let before = st.mem;
            let entries = st.evict(db, excess, emitted)?;
            self.account(before, st.mem);
            self.evicted.fetch_add(entries, Ordering::Relaxed);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn update(
        &self,
        st: &mut PartState,
        db: Option<&DB>,
        end: i64,
        key: &[u8],
        views: &[Input],
        row: usize,
        order: Order,
    ) -> Result<()> {
        let hint = st.pane_hint;
        let window = st.windows.entry(end).or_default();
        let table = window.entries.to_mut();
        let before = table.bytes();
        let hash = table.hash(key);
        let i = match table.find(hash, key) {
            Some(i) => i,
            None => {
                let stored = match (
                    may_be_stored(&window.filter, window.evicted, window.restored, key),
                    db,
                ) {
                    (true, Some(db)) => {
                        let mut k = st.prefix.clone();
                        k.extend_from_slice(&ordered(end));
                        k.extend_from_slice(key);
                        db.get_pinned(&k)
                            .map_err(db_error)?
                            .map(|v| acc::decode(&v, self.plan.aggs.len()).map(|(accs, _)| accs))
                            .transpose()?
                    }
                    _ => None,
                };
                // A pane that fills (an eighth of the last whole pane's entries) gets room
                // for the rest at once, and skips the doublings that would rehash most of
                // its keys; one that stays sparse (late rows, a pane ahead) never does.
                // Counted below, with the entry.
                if hint >= 64 && table.len() == hint / 8 {
                    table.reserve(hint - table.len());
                }
                // Made in place (a vector of them for every new entry was an allocation).
                let i = match stored {
                    Some(accs) => table.insert(hash, key, accs, false),
                    None => {
                        table.insert(hash, key, self.plan.aggs.iter().map(AggDef::new_acc), true)
                    }
                };
                table.heap += table.accs(i).iter().map(Acc::heap_size).sum::<usize>();
                i
            }
        };
        let accs = table.update(i);
        if self.variable_size {
            let before: usize = accs.iter().map(Acc::heap_size).sum();
            for (acc, view) in accs.iter_mut().zip(views) {
                acc.update(view, row, order);
            }
            let after: usize = accs.iter().map(Acc::heap_size).sum();
            table.heap = (table.heap + after).saturating_sub(before);
        } else {
            for (acc, view) in accs.iter_mut().zip(views) {
                acc.update(view, row, order);
            }
        }
        st.mem = (st.mem + table.bytes()).saturating_sub(before);
        Ok(())
    }

    /// A partition's state as the database holds it: its progress record `meta`, which
    /// windows have entries (one seek per window; the entries stay there until read), and
    /// its sessions.
    fn load_part(&self, db: &DB, name: &Arc<str>, meta: &[u8]) -> Result<Part> {
        if meta.len() != 28 {
            return Err(Error::Internal(format!(
                "aggregate state of `{}`: bad record for partition {name}",
                self.plan.stage
            )));
        }
        let i64_at = |at: usize| i64::from_le_bytes(meta[at..at + 8].try_into().expect("8"));
        let id = u32::from_le_bytes(meta[24..28].try_into().expect("4"));
        let part = self.new_part(name, id);
        {
            let mut st = part.state.lock().expect("partition lock");
            st.max_time = i64_at(0);
            st.seq = i64_at(8) as u64;
            part.watermark
                .store(self.watermark_of(st.max_time), Ordering::Relaxed);
            part.emitted.store(i64_at(16), Ordering::Relaxed);
            let mut it = db.raw_iterator();
            it.seek(&st.prefix);
            while let Some(key) = it.key() {
                let Some(rest) = key.strip_prefix(st.prefix.as_slice()) else {
                    break;
                };
                let end = unordered(rest);
                st.windows.insert(
                    end,
                    Window {
                        evicted: true,
                        stored: true,
                        restored: true,
                        ..Window::default()
                    },
                );
                let Some(next) = end.checked_add(1) else {
                    break;
                };
                let mut seek = st.prefix.clone();
                seek.extend_from_slice(&ordered(next));
                it.seek(&seek);
            }
            it.status().map_err(db_error)?;
            let mem = st.sessions.restore(db)?;
            st.mem = mem;
            self.memory.fetch_add(mem as i64, Ordering::Relaxed);
            let emitted = part.emitted.load(Ordering::Relaxed);
            self.set_due(&part, &st, emitted);
        }
        Ok(part)
    }

    /// Drops restored partitions that were not assigned here (idle, or no more assignments
    /// come) from memory: if one is assigned later, its state is read from the database.
    fn drop_stale(&self, names: &[Arc<str>]) {
        if names.is_empty() {
            return;
        }
        let mut parts = self.parts.write().expect("parts lock");
        for name in names {
            let stale = parts.get(name).is_some_and(|p| p.restored_unassigned());
            if stale && let Some(part) = parts.remove(name) {
                let st = part.state.lock().expect("partition lock");
                self.memory.fetch_sub(st.mem as i64, Ordering::Relaxed);
            }
        }
    }

    fn window_start(&self, end: i64) -> i64 {
        match self.plan.window {
            WindowKind::Tumbling { size } | WindowKind::Sliding { size, .. } => end - size,
            WindowKind::Session { .. } => end,
        }
    }

    /// The pane length of tumbling and sliding windows (a tumbling window is one pane).
    fn slide(&self) -> Option<i64> {
        match self.plan.window {
            WindowKind::Tumbling { size } => Some(size),
            WindowKind::Sliding { slide, .. } => Some(slide),
            WindowKind::Session { .. } => None,
        }
    }

    /// The end of the last window that holds the pane ending at `pane`.
    fn last_window_of(&self, pane: i64) -> i64 {
        match self.plan.window {
            WindowKind::Sliding { size, slide } => pane.saturating_add(size - slide),
            _ => pane,
        }
    }
}

/// What [`AggregateState::add`] did not take.
#[derive(Default)]
pub struct Added {
    /// (row, event time, the partition's closed-through time when it came).
    pub late: Vec<(usize, i64, i64)>,
    pub no_time: Vec<usize>,
    /// (row, event time) of times before the year 0 or too far ahead of the clock.
    pub out_of_range: Vec<(usize, i64)>,
}

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z, in ms since 1970.
const FIRST_TIME: i64 = -62_167_219_200_000;
const LAST_TIME: i64 = 253_402_300_799_999;
