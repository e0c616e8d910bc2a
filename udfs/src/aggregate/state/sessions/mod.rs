//! Session windows: per key, disjoint sessions; in memory up to the stage's budget, in the
//! database beyond it and at checkpoints.
//!
//! # In the database
//! ```text
//! agg/<stage>/s/<len><partition><key>           the key's sessions, all of them
//! agg/<stage>/e/<len><partition><end><key>      an end marker of the key
//! ```
//! Every key whose sessions the database holds has an end marker at or before the
//! earliest end of those sessions: written with them (at a checkpoint, or when they leave
//! memory to make room). Closing reads the markers due and only those keys, so sessions
//! that left memory cost nothing until they are due. A marker is stale once its session
//! grew or closed; it is deleted when reached, and only while its key is in memory marked
//! changed, so the key's next write sets the marker it needs. Keys that left memory (or
//! were restored) are in a Bloom filter: a key never seen before costs no lookup.

use super::*;

mod ends;
mod merge;

use ends::EndMarks;
pub(super) use merge::{StoredSessions, merge_all_sessions, merge_sessions, write_all_sessions};

/// A key as the sessions hold it: once, shared by its slot and its end markers (a marker
/// set or re-armed copies a pointer, not the key).
pub(super) type Key = Arc<[u8]>;

pub(super) struct Sessions {
    slots: HashMap<Key, Slot>,
    /// (end, key) of every session end ever set in memory; stale ones are skipped when
    /// popped.
    ends: EndMarks,
    /// Keys whose sessions the database may hold while memory does not.
    filter: KeyFilter,
    stored: StoredIndex,
    /// The hash table's bytes as counted: its capacity's.
    table: usize,
    keys: DbKeys,
    shape: Shape,
}

/// What is known of a partition's sessions in the database.
#[derive(Default)]
struct StoredIndex {
    /// At or before the earliest end marker; `None` when there is none.
    first: Option<i64>,
    /// The keys it holds sessions of (as far as this process wrote and deleted them): the
    /// filter is rebuilt when it holds many more keys than this.
    keys: usize,
}

impl StoredIndex {
    fn marker_at(&mut self, end: i64) {
        self.first = Some(self.first.map_or(end, |f| f.min(end)));
    }
}

/// Where a partition's sessions are in the database.
#[derive(Clone)]
struct DbKeys {
    sessions: Vec<u8>,
    ends: Vec<u8>,
}

impl DbKeys {
    fn session(&self, key: &[u8]) -> Vec<u8> {
        [self.sessions.as_slice(), key].concat()
    }

    fn end(&self, end: i64, key: &[u8]) -> Vec<u8> {
        [self.ends.as_slice(), &ordered(end), key].concat()
    }
}

#[derive(Default)]
struct Slot {
    sessions: Vec<Session>,
    dirty: bool,
    stored: bool,
    /// A row came since an eviction pass last looked: the pass spares it once (a second
    /// chance, so that keys in use stay and quiet ones leave).
    touched: bool,
    /// The end of a marker the database holds for the key, at or before its earliest
    /// open session's end while that stays so: its writes need no new one meanwhile.
    marker: Option<i64>,
    /// The end of the group its sessions closed on their own belong to, while another
    /// partition's session of the key holds that group open: the key needs a marker there.
    held: Option<i64>,
}

#[derive(Clone)]
struct Session {
    start: i64,
    end: i64,
    accs: Box<[Acc]>,
}

/// A slot of the sessions' hash table (key and slot, and the control byte), counted for
/// the table's capacity.
const SLOT: usize = std::mem::size_of::<(Key, Slot)>() + 1;
/// An end marker (its key apart): its place in its end's vector, with half as much again
/// for the vectors' room to grow and the map of ends.
const MARKER: usize = std::mem::size_of::<Key>() * 3 / 2;
/// An allocation's rounding, on average.
const ALLOC: usize = 16;

/// A shared key's counts beside its bytes.
const SHARED: usize = 2 * std::mem::size_of::<usize>();

/// What a key's sessions take beyond its place in the table: the key (shared by the table
/// and the end markers), a marker, the sessions' vector as allocated, and each session's
/// accumulators with what they own.
fn slot_size(key: &[u8], slot: &Slot, shape: Shape) -> usize {
    let fixed = key.len()
        + SHARED
        + ALLOC
        + MARKER
        + slot.sessions.capacity() * std::mem::size_of::<Session>();
    if shape.variable {
        return fixed
            + slot
                .sessions
                .iter()
                .map(|s| accs_size(&s.accs))
                .sum::<usize>();
    }
    fixed + slot.sessions.len() * shape.session
}

/// A session's accumulators: their allocation, and what they own.
fn accs_size(accs: &[Acc]) -> usize {
    ALLOC + std::mem::size_of_val(accs) + accs.iter().map(Acc::heap_size).sum::<usize>()
}

/// The sessions' accumulators: how many a session has, and what they take where that
/// stays as made (counts, sums; not a distinct set, not text, see `AggDef::variable_size`):
/// then a row that only changes their values leaves its key's size as it was, known
/// without reading them.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    aggs: usize,
    variable: bool,
    /// A session's accumulators with what they own, where not `variable`.
    session: usize,
}

impl Shape {
    pub(super) fn of(aggs: &[AggDef]) -> Shape {
        let accs: Box<[Acc]> = aggs.iter().map(AggDef::new_acc).collect();
        Shape {
            aggs: aggs.len(),
            variable: aggs.iter().any(AggDef::variable_size),
            session: accs_size(&accs),
        }
    }
}

/// A key's sessions as the database holds them, with the end of the marker written with
/// them (read back as [`Slot::marker`]).
fn encode_sessions(sessions: &[Session], marker: Option<i64>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&(sessions.len() as u32).to_le_bytes());
    for s in sessions {
        out.extend_from_slice(&s.start.to_le_bytes());
        out.extend_from_slice(&s.end.to_le_bytes());
        acc::encode(&s.accs, out);
    }
    if let Some(m) = marker {
        out.extend_from_slice(&m.to_le_bytes());
    }
}

/// What [`encode_sessions`] wrote (values written before markers were kept in them have
/// none).
fn decode_sessions(value: &[u8], aggs: usize) -> Result<(Vec<Session>, Option<i64>)> {
    let bad = || Error::Internal("corrupt session state".into());
    let n = u32::from_le_bytes(value.get(..4).ok_or_else(bad)?.try_into().expect("4"));
    let mut rest = &value[4..];
    // A session takes at least 16 bytes: a corrupt count does not reserve more.
    let mut sessions = Vec::with_capacity((n as usize).min(rest.len() / 16));
    for _ in 0..n {
        if rest.len() < 16 {
            return Err(bad());
        }
        let start = i64::from_le_bytes(rest[..8].try_into().expect("8"));
        let end = i64::from_le_bytes(rest[8..16].try_into().expect("8"));
        let (accs, tail) = acc::decode(&rest[16..], aggs)?;
        rest = tail;
        sessions.push(Session {
            start,
            end,
            accs: accs.into_boxed_slice(),
        });
    }
    let marker = match rest.len() {
        0 => None,
        8 => Some(i64::from_le_bytes(rest.try_into().expect("8"))),
        _ => return Err(bad()),
    };
    Ok((sessions, marker))
}

/// The earliest end of `sessions`.
fn first_end(sessions: &[Session]) -> Option<i64> {
    sessions.iter().map(|s| s.end).min()
}

impl Sessions {
    pub(super) fn new(sessions: Vec<u8>, ends: Vec<u8>, shape: Shape) -> Self {
        Sessions {
            slots: HashMap::new(),
            ends: EndMarks::default(),
            filter: KeyFilter::default(),
            stored: StoredIndex::default(),
            table: 0,
            keys: DbKeys { sessions, ends },
            shape,
        }
    }

    /// Adds a row at `time` (its session would end at `end`); false when it is late.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add(
        &mut self,
        db: Option<&DB>,
        key: &[u8],
        (time, end, closed): (i64, i64, i64),
        aggs: &[AggDef],
        views: &[Input],
        row: usize,
        order: Order,
        mem: &mut usize,
    ) -> Result<bool> {
        // A row behind its partition's watermark is late: it could only join sessions that
        // have ended, and whether those were emitted yet depends on batch boundaries.
        if time < closed {
            return Ok(false);
        }
        self.fetch(db, key, mem)?;
        let mut entry = match self.slots.entry_ref(key) {
            EntryRef::Occupied(o) => o,
            EntryRef::Vacant(v) => v.insert_entry(Slot::default()),
        };
        let slot = entry.get_mut();
        let before = if slot.sessions.is_empty() {
            0
        } else {
            slot_size(key, slot, self.shape)
        };
        // Sessions that overlap or touch merge (Flink's rule): rows exactly `gap` apart
        // are one session. The first one the row touches takes it and the others it
        // bridges; a row touching none opens a session.
        let overlapping = |s: &Session| s.start <= end && time <= s.end;
        let mut at = None;
        let mut i = 0;
        while i < slot.sessions.len() {
            if !overlapping(&slot.sessions[i]) {
                i += 1;
                continue;
            }
            match at {
                None => {
                    at = Some(i);
                    i += 1;
                }
                Some(j) => {
                    // Moves the last session to `i`, which is after `j`.
                    let s = slot.sessions.swap_remove(i);
                    let into = &mut slot.sessions[j];
                    for (a, b) in into.accs.iter_mut().zip(s.accs.into_vec()) {
                        a.merge(b);
                    }
                    into.start = into.start.min(s.start);
                    into.end = into.end.max(s.end);
                }
            }
        }
        // A new session needs an end marker. A session that grows keeps the marker it
        // has: an end it has passed, re-armed when popped (`close`).
        if at.is_none() {
            self.ends.push(end, entry.key().clone());
        }
        let slot = entry.into_mut();
        let session = match at {
            Some(j) => {
                let s = &mut slot.sessions[j];
                s.start = s.start.min(time);
                s.end = s.end.max(end);
                s
            }
            None => {
                // Most keys have one session at a time: no room for four.
                slot.sessions.reserve_exact(1);
                slot.sessions.push(Session {
                    start: time,
                    end,
                    accs: aggs.iter().map(AggDef::new_acc).collect(),
                });
                slot.sessions.last_mut().expect("just pushed")
            }
        };
        for (acc, view) in session.accs.iter_mut().zip(views) {
            acc.update(view, row, order);
        }
        slot.dirty = true;
        slot.touched = true;
        *mem = (*mem + slot_size(key, slot, self.shape)).saturating_sub(before);
        self.count_table(mem);
        if self.ends.len() > 4 * self.slots.len() + 1024 {
            self.compact();
        }
        Ok(true)
    }

    /// What [`Self::add`] and the others count in a partition's memory, counted again
    /// from what the sessions hold, every accumulator read (tests compare the two).
    #[cfg(test)]
    pub(super) fn recount(&self) -> usize {
        let every = Shape {
            variable: true,
            ..self.shape
        };
        self.slots.capacity() * SLOT
            + self
                .slots
                .iter()
                .map(|(key, slot)| slot_size(key, slot, every))
                .sum::<usize>()
            + self.filter.size()
    }

    /// Whether the database may hold sessions that memory does not.
    pub(super) fn spilled(&self) -> bool {
        self.filter.size() > 0
    }

    /// Reads `key`'s sessions into memory where the database may hold them and memory
    /// does not.
    fn fetch(&mut self, db: Option<&DB>, key: &[u8], mem: &mut usize) -> Result<()> {
        if let Some(db) = db
            && self.spilled()
            && !self.slots.contains_key(key)
            && self.filter.may_contain(key)
        {
            self.load(db, key, mem)?;
        }
        Ok(())
    }

    /// Reads `key`'s sessions from the database unless memory has them: true when memory
    /// has them now.
    fn load(&mut self, db: &DB, key: &[u8], mem: &mut usize) -> Result<bool> {
        if self.slots.contains_key(key) {
            return Ok(true);
        }
        let Some(value) = db.get_pinned(self.keys.session(key)).map_err(db_error)? else {
            return Ok(false);
        };
        let (sessions, marker) = decode_sessions(&value, self.shape.aggs)?;
        let key = Key::from(key);
        if let Some(end) = first_end(&sessions) {
            self.ends.push(end, key.clone());
        }
        let slot = Slot {
            sessions,
            stored: true,
            marker,
            ..Slot::default()
        };
        *mem += slot_size(&key, &slot, self.shape);
        self.slots.insert(key, slot);
        self.count_table(mem);
        Ok(true)
    }

    /// After every slot was taken out (all sessions closing): no markers, nothing in the
    /// database as far as the filter and the index know, the table's memory given back.
    fn emptied(&mut self, mem: &mut usize) {
        self.ends = EndMarks::default();
        *mem = mem.saturating_sub(self.filter.size());
        self.filter = KeyFilter::default();
        self.stored = StoredIndex::default();
        self.slots.shrink_to_fit();
        self.count_table(mem);
    }

    /// Counts the hash table's capacity in `mem` as it changes.
    fn count_table(&mut self, mem: &mut usize) {
        let now = self.slots.capacity() * SLOT;
        *mem = (*mem + now).saturating_sub(self.table);
        self.table = now;
    }

    /// The earliest end marker, in memory or in the database: at or before every
    /// session's end.
    pub(super) fn first_end(&self) -> Option<i64> {
        let memory = self.ends.first();
        match (memory, self.stored.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops stale end markers.
    pub(super) fn compact(&mut self) {
        let mut live = EndMarks::default();
        for (key, slot) in &self.slots {
            for session in &slot.sessions {
                live.push(session.end, key.clone());
            }
        }
        self.ends = live;
    }

    /// Writes keys' sessions to the database (those changed; the others are there) and
    /// drops them from memory, in the hash table's order, until about `target` bytes are
    /// free (`emitted`: what the partition has emitted; `mem`: its memory). Returns the
    /// keys written out.
    pub(super) fn evict(
        &mut self,
        db: &DB,
        target: usize,
        emitted: i64,
        mem: &mut usize,
    ) -> Result<u64> {
        // Keys no row came for since the last pass first; then any.
        let mut estimate = 0;
        let shape = self.shape;
        let mut out: Vec<(Key, Slot)> = Vec::new();
        for spare_touched in [true, false] {
            if estimate >= target {
                break;
            }
            out.extend(self.slots.extract_if(|key, slot| {
                if estimate >= target || (spare_touched && std::mem::take(&mut slot.touched)) {
                    return false;
                }
                estimate += slot_size(key, slot, shape);
                true
            }));
        }
        if out.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        let mut value = Vec::new();
        for (key, slot) in out.iter_mut() {
            *mem = mem.saturating_sub(slot_size(key, slot, self.shape));
            if slot.dirty {
                self.keys
                    .write(&mut self.stored, key, slot, emitted, &mut batch, &mut value);
            }
            if !slot.sessions.is_empty() && !self.filter.may_contain(key) {
                *mem += self.filter.insert(key);
            }
            if batch.size_in_bytes() > WRITE_BATCH_BYTES {
                db.write_opt(std::mem::take(&mut batch), &unlogged())
                    .map_err(db_error)?;
            }
        }
        db.write_opt(batch, &unlogged()).map_err(db_error)?;
        // Keys deleted since they were written keep their bits: a filter holding many more
        // keys than the database is made again from the keys it holds.
        if self.filter.len() > 2 * self.stored.keys + 4096 {
            self.refill_filter(db, mem)?;
        }
        if self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to(self.slots.len() * 2);
        }
        self.count_table(mem);
        self.compact();
        Ok(out.len() as u64)
    }

    /// Moves the keys with a session closed by `through` (see [`session_closed`]) to `out`:
    /// the merge across partitions decides what is emitted.
    /// Keys in the database with a marker `through` passed are read into memory first.
    ///
    /// Every session has a marker at or before its end: set when it opened, and left
    /// behind as it grew (one marker per session rather than per row). A marker
    /// taken for a key whose sessions are not all closed is set again at the earliest
    /// open one's end.
    pub(super) fn close(
        &mut self,
        db: Option<&DB>,
        through: i64,
        out: &mut Vec<Key>,
        mem: &mut usize,
    ) -> Result<()> {
        if let (Some(db), Some(first)) = (db, self.stored.first)
            && session_closed(first, through)
        {
            self.read_due(db, through, mem)?;
        }
        while let Some(keys) = self.ends.pop_closed(through) {
            for key in keys {
                // The slot's own key from here on: the marker's may be of a slot the key
                // had before (left and came back), kept only by stale markers.
                let Some((key, slot)) = self.slots.get_key_value(&*key) else {
                    continue;
                };
                let key = key.clone();
                let closed = slot.sessions.iter().any(|x| session_closed(x.end, through));
                let open = slot
                    .sessions
                    .iter()
                    .map(|x| x.end)
                    .filter(|end| !session_closed(*end, through))
                    .min();
                let key = match open {
                    Some(open) => {
                        self.ends.push(open, key.clone());
                        key
                    }
                    None => key,
                };
                if closed {
                    out.push(key);
                }
            }
        }
        Ok(())
    }

    /// Reads the keys whose database end markers `through` passed into memory, marked
    /// changed: their markers are deleted, and their next write sets the ones they need.
    fn read_due(&mut self, db: &DB, through: i64, mem: &mut usize) -> Result<()> {
        let mut due: Vec<Box<[u8]>> = Vec::new();
        let mut batch = WriteBatch::default();
        // From the first marker on: the deleted ones before it are not walked over again.
        let from = self.stored.first.take().unwrap_or(i64::MIN);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(prefix_end(&self.keys.ends));
        let mut it = db.raw_iterator_opt(options);
        it.seek(self.keys.end(from, &[]));
        while let Some(k) = it.key() {
            let Some(rest) = k.strip_prefix(self.keys.ends.as_slice()) else {
                break;
            };
            let end = unordered(rest);
            if !session_closed(end, through) {
                self.stored.first = Some(end);
                break;
            }
            batch.delete(k);
            due.push(rest[8..].into());
            it.next();
        }
        it.status().map_err(db_error)?;
        drop(it);
        db.write_opt(batch, &unlogged()).map_err(db_error)?;
        for key in due {
            if self.load(db, &key, mem)? {
                let slot = self.slots.get_mut(&*key).expect("in memory");
                slot.dirty = true;
                slot.marker = None;
            }
        }
        Ok(())
    }

    /// Writes the changed keys (`emitted`: what the partition has emitted).
    pub(super) fn snapshot(
        &mut self,
        emitted: i64,
        batch: &mut WriteBatch,
        stats: &mut SnapshotStats,
        flush: &mut dyn FnMut(&mut WriteBatch, &mut SnapshotStats) -> Result<()>,
    ) -> Result<()> {
        let mut value = Vec::new();
        for (k, slot) in self.slots.iter_mut().filter(|(_, s)| s.dirty) {
            self.keys
                .write(&mut self.stored, k, slot, emitted, batch, &mut value);
            slot.stored = !slot.sessions.is_empty();
            slot.dirty = false;
            stats.keys += 1;
            flush(batch, stats)?;
        }
        Ok(())
    }

    /// Reads which keys the database holds sessions of into the filter (their sessions
    /// are read when a row or a closing session needs them) and where its first end marker
    /// is. Returns the memory the filter takes.
    pub(super) fn restore(&mut self, db: &DB) -> Result<usize> {
        let mut it = db.raw_iterator();
        it.seek(&self.keys.ends);
        self.stored.first = it
            .key()
            .and_then(|k| k.strip_prefix(self.keys.ends.as_slice()))
            .map(unordered);
        // Every key written with sessions since end markers exist has one, so a partition
        // without any is from a checkpoint written before: they are set now.
        if self.stored.first.is_none() {
            let mut batch = WriteBatch::default();
            it.seek(&self.keys.sessions);
            while let Some(k) = it.key() {
                let Some(key) = k.strip_prefix(self.keys.sessions.as_slice()) else {
                    break;
                };
                let value = it.value().expect("a value at a key");
                if let Some(end) = first_end(&decode_sessions(value, self.shape.aggs)?.0) {
                    batch.put(self.keys.end(end, key), []);
                    self.stored.marker_at(end);
                }
                if batch.size_in_bytes() > WRITE_BATCH_BYTES {
                    db.write_opt(std::mem::take(&mut batch), &unlogged())
                        .map_err(db_error)?;
                }
                it.next();
            }
            it.status().map_err(db_error)?;
            db.write_opt(batch, &unlogged()).map_err(db_error)?;
        }
        let mut mem = 0;
        self.refill_filter(db, &mut mem)?;
        Ok(mem)
    }

    /// Makes the filter (and the count of stored keys) again from the keys the database
    /// holds sessions of, counting its memory in `mem`.
    fn refill_filter(&mut self, db: &DB, mem: &mut usize) -> Result<()> {
        *mem = mem.saturating_sub(self.filter.size());
        self.filter = KeyFilter::default();
        self.stored.keys = 0;
        let mut it = db.raw_iterator();
        it.seek(&self.keys.sessions);
        while let Some(key) = it
            .key()
            .and_then(|k| k.strip_prefix(self.keys.sessions.as_slice()))
        {
            *mem += self.filter.insert(key);
            self.stored.keys += 1;
            it.next();
        }
        it.status().map_err(db_error)
    }
}

impl DbKeys {
    /// Puts `slot` into `batch`: its sessions and a marker at the earliest end of those
    /// still open (ending at or after `emitted`, what the partition has emitted), or its
    /// deletion when none is left. A key whose sessions all closed while another
    /// partition's session of the key keeps their group open is marked at the group's end
    /// (`Slot::held`).
    fn write(
        &self,
        stored: &mut StoredIndex,
        key: &[u8],
        slot: &mut Slot,
        emitted: i64,
        batch: &mut WriteBatch,
        value: &mut Vec<u8>,
    ) {
        if slot.sessions.is_empty() {
            if slot.stored {
                batch.delete(self.session(key));
                stored.keys = stored.keys.saturating_sub(1);
            }
            return;
        }
        if !slot.stored {
            stored.keys += 1;
        }
        let open = slot
            .sessions
            .iter()
            .map(|s| s.end)
            .chain(slot.held)
            .filter(|end| *end >= emitted);
        match open.min() {
            // The database's marker comes first still.
            Some(end) if slot.marker.is_some_and(|m| m <= end) => {}
            Some(end) => {
                batch.put(self.end(end, key), []);
                stored.marker_at(end);
                slot.marker = Some(end);
            }
            None => {}
        }
        encode_sessions(&slot.sessions, slot.marker, value);
        batch.put(self.session(key), &*value);
    }
}

/// Whether a session ending at `end` is closed once the watermark is `through`: only when
/// the watermark is past its end, since a row at `end` itself would still join it (at the
/// end of the input, `through` is the end of time and every session closes).
fn session_closed(end: i64, through: i64) -> bool {
    end < through || through == i64::MAX
}
