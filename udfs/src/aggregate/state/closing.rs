//! Closing windows: their rows in key order, partitions merged, in chunks.

use super::*;

/// The entries of `table` in key order, comparing the first 16 bytes of the keys as one
/// integer first: keys of a column or two differ there, and a million keys then sort
/// without a `memcmp` per step.
pub(super) fn sorted(table: &Table) -> Vec<u32> {
    let mut order: Vec<(u128, u32)> = (0..table.len())
        .map(|i| (prefix(table.key(i)), i as u32))
        .collect();
    order.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| table.key(a.1 as usize).cmp(table.key(b.1 as usize)))
    });
    order.into_iter().map(|(_, i)| i).collect()
}

/// A key's first 16 bytes as one integer, in the keys' order where they differ there.
fn prefix(k: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = k.len().min(16);
    b[..n].copy_from_slice(&k[..n]);
    u128::from_be_bytes(b)
}

/// The sources of a closing window that have entries left, as a binary heap ordered by
/// their next key, then by source: the top is the first source holding the smallest key,
/// as the merge takes them. A window of `size / slide` panes from `p` partitions has that
/// many sources, most holding the same keys; choosing the next key costs about log2 of
/// them, each an integer compare of the keys' first 16 bytes and lengths, which order keys
/// up to 16 bytes long completely (a key is read from its table only where longer ones tie).
struct Heads(Vec<Head>);

/// A source's next key, as its first 16 bytes (one integer) and its length.
#[derive(Clone, Copy)]
struct Head {
    prefix: u128,
    len: u32,
    source: u32,
}

impl Head {
    fn new(key: &[u8], source: usize) -> Head {
        Head {
            prefix: prefix(key),
            len: key.len() as u32,
            source: source as u32,
        }
    }

    /// The keys' order: by prefix, then (padded keys that tie are equal up to the shorter
    /// one's end) by length, unless both are longer than the prefix: then by the keys.
    fn cmp_keys<'a>(&self, other: &Head, keys: impl FnOnce() -> (&'a [u8], &'a [u8])) -> Cmp {
        self.prefix.cmp(&other.prefix).then_with(|| {
            if self.len > 16 && other.len > 16 {
                let (a, b) = keys();
                a.cmp(b)
            } else {
                self.len.cmp(&other.len)
            }
        })
    }
}

impl Heads {
    fn new(sources: &[PartEntries]) -> Self {
        let mut heads = Heads(
            sources
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some(Head::new(s.peek()?, i)))
                .collect(),
        );
        for i in (0..heads.0.len() / 2).rev() {
            heads.sift_down(i, sources);
        }
        heads
    }

    fn top(&self) -> Option<usize> {
        self.0.first().map(|h| h.source as usize)
    }

    /// The top source, if its next key is `key` (whose head is `head`).
    fn top_if(&self, head: &Head, key: &[u8], sources: &[PartEntries]) -> Option<usize> {
        let top = self.0.first()?;
        let keys = || (Self::key(top, sources), key);
        top.cmp_keys(head, keys)
            .is_eq()
            .then_some(top.source as usize)
    }

    fn key<'a>(head: &Head, sources: &'a [PartEntries]) -> &'a [u8] {
        sources[head.source as usize].peek().expect("a head's key")
    }

    /// Whether head `a` comes before head `b`.
    fn before(&self, a: usize, b: usize, sources: &[PartEntries]) -> bool {
        let (a, b) = (&self.0[a], &self.0[b]);
        a.cmp_keys(b, || (Self::key(a, sources), Self::key(b, sources)))
            .then(a.source.cmp(&b.source))
            .is_lt()
    }

    fn sift_down(&mut self, mut i: usize, sources: &[PartEntries]) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < self.0.len() && self.before(l, least, sources) {
                least = l;
            }
            if r < self.0.len() && self.before(r, least, sources) {
                least = r;
            }
            if least == i {
                return;
            }
            self.0.swap(i, least);
            i = least;
        }
    }

    /// The top source moved on: its next key takes its place, or it leaves if it has none.
    fn advance_top(&mut self, sources: &[PartEntries]) {
        let source = self.0[0].source as usize;
        match sources[source].peek() {
            Some(key) => self.0[0] = Head::new(key, source),
            None => {
                self.0.swap_remove(0);
            }
        }
        self.sift_down(0, sources);
    }
}

/// Windows taken out of the partitions, waiting to be emitted.
#[derive(Default)]
pub struct Closing {
    windows: VecDeque<ClosingWindow>,
    /// Session rows, ready.
    pub(super) ready: Vec<SessionRow>,
    /// Sessions in the database, all closing (the end of the input).
    pub(super) stored_sessions: Option<StoredSessions>,
    pub(super) db: Option<Arc<StateDb>>,
    pub(super) aggs: usize,
}

/// An emitted row: a key's accumulators in one window.
pub struct OutRow {
    /// The group key, row-encoded.
    pub key: Box<[u8]>,
    pub start: i64,
    pub end: i64,
    pub accs: Box<[Acc]>,
}
pub(super) type SessionRow = OutRow;
/// A key and its accumulators.
pub(super) type KeyedAccs = (Box<[u8]>, Box<[Acc]>);

struct ClosingWindow {
    end: i64,
    start: i64,
    /// One per partition that had the window (or one per pane, merged across them).
    sources: Vec<PartEntries>,
    /// Ranges of the database to delete once the window is emitted (see
    /// [`Closing::delete_after`]).
    deletes: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A pane's entries in memory, in key order, shared by the windows of one emission that
/// hold it. Rows are made as they are read (a key and its accumulators boxed at a time, so
/// an emission does not hold a second copy of the pane): moved out of the table by its
/// last holder (the pane's last window, read after the others), copied otherwise.
struct Entries {
    table: Arc<Table>,
    order: Arc<Vec<u32>>,
    next: usize,
}

impl Entries {
    /// Entries ahead of the one read whose place is loaded, and whose key is loaded.
    const AHEAD: usize = 16;
    const KEY_AHEAD: usize = 4;

    /// Moves to the next entry, asking for those ahead to be loaded.
    fn advance(&mut self) {
        self.next += 1;
        if let Some(&i) = self.order.get(self.next + Self::AHEAD) {
            self.table.prefetch_entry(i as usize);
        }
        if let Some(&i) = self.order.get(self.next + Self::KEY_AHEAD) {
            self.table.prefetch_key(i as usize);
        }
    }

    fn front_key(&self) -> Option<&[u8]> {
        let i = *self.order.get(self.next)?;
        Some(self.table.key(i as usize))
    }

    fn pop_front(&mut self) -> Option<KeyedAccs> {
        let i = *self.order.get(self.next)? as usize;
        self.advance();
        let key: Box<[u8]> = self.table.key(i).into();
        let accs = match Arc::get_mut(&mut self.table) {
            Some(table) => table.take_accs(i),
            None => self.table.accs(i).into(),
        };
        Some((key, accs))
    }

    /// Merges the first entry's accumulators into `into` and drops the entry: moved where
    /// this is the last holder, read in place otherwise (no row is made).
    fn pop_front_into(&mut self, into: &mut [Acc]) {
        let i = self.order[self.next] as usize;
        self.advance();
        match Arc::get_mut(&mut self.table) {
            Some(table) => {
                for (a, b) in into.iter_mut().zip(table.accs_mut(i)) {
                    a.merge(std::mem::take(b));
                }
            }
            None => {
                for (a, b) in into.iter_mut().zip(self.table.accs(i)) {
                    a.merge_ref(b);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.next >= self.order.len()
    }
}

/// One partition's entries of a closing window: those in memory (sorted) and those in the
/// database (read in key order a chunk at a time); memory is newer where both have a key.
struct PartEntries {
    memory: Entries,
    stored: Option<Stored>,
}

struct Stored {
    /// The window's key prefix; the next key to read is `next` (after the prefix).
    prefix: Vec<u8>,
    /// The prefix of the next window: the end of the range.
    upto: Vec<u8>,
    /// Delete the range once read (the pane's last window).
    delete: bool,
    frozen: Option<Arc<Frozen>>,
    next: Option<Vec<u8>>,
    buffer: VecDeque<KeyedAccs>,
    done: bool,
}

impl Closing {
    pub(super) fn add(
        &mut self,
        end: i64,
        start: i64,
        memory: (Arc<Table>, Arc<Vec<u32>>),
        stored: Option<StoredRange>,
    ) {
        let source = PartEntries {
            memory: Entries {
                table: memory.0,
                order: memory.1,
                next: 0,
            },
            stored: stored.map(|r| Stored {
                prefix: r.prefix,
                upto: r.upto,
                delete: r.delete,
                frozen: r.frozen,
                next: None,
                buffer: VecDeque::new(),
                done: false,
            }),
        };
        self.window_at(end, start).sources.push(source);
    }

    /// Deletes a pane's entries in the database once the window ending at `end` is
    /// emitted: a pane read from memory only (merged across partitions) whose entries a
    /// checkpoint wrote, none evicted since (memory holds each of them, newer or equal).
    pub(super) fn delete_after(&mut self, end: i64, start: i64, range: (Vec<u8>, Vec<u8>)) {
        self.window_at(end, start).deletes.push(range);
    }

    /// The window ending at `end`. Windows arrive partition by partition; they are kept
    /// in end order, one per end.
    fn window_at(&mut self, end: i64, start: i64) -> &mut ClosingWindow {
        let at = self.windows.partition_point(|w| w.end < end);
        if self.windows.get(at).is_none_or(|w| w.end != end) {
            self.windows.insert(
                at,
                ClosingWindow {
                    end,
                    start,
                    sources: Vec::new(),
                    deletes: Vec::new(),
                },
            );
        }
        &mut self.windows[at]
    }

    /// The next rows, at most [`CHUNK`];
    /// empty when everything was emitted. A window's stored entries are deleted once it
    /// has been read to its end.
    pub fn next_chunk(&mut self) -> Result<Vec<SessionRow>> {
        let mut rows = Vec::new();
        if !self.ready.is_empty() {
            let n = self.ready.len().min(CHUNK);
            rows.extend(self.ready.drain(..n));
            return Ok(rows);
        }
        if let (Some(sessions), Some(db)) = (&mut self.stored_sessions, &self.db) {
            sessions.next_rows(db, self.aggs, &mut rows)?;
            if rows.is_empty() {
                self.stored_sessions = None;
            }
            return Ok(rows);
        }
        while rows.len() < CHUNK {
            let Some(window) = self.windows.front_mut() else {
                break;
            };
            let (start, end) = (window.start, window.end);
            let db = self.db.as_deref().map(|d| &**d);
            for s in window.sources.iter_mut() {
                s.fill(db, self.aggs)?;
            }
            let sources = &mut window.sources;
            let mut heads = Heads::new(sources);
            while rows.len() < CHUNK {
                // The smallest key among the sources (the first source that has it), merged
                // with the same key of the sources after it. Moved, not copied.
                let Some(mut at) = heads.top() else {
                    break;
                };
                let (key, mut accs) = sources[at].pop();
                let head = Head::new(&key, at);
                loop {
                    // The source taken from moves on; the next holds the key too, or not.
                    sources[at].fill(db, self.aggs)?;
                    heads.advance_top(sources);
                    let Some(next) = heads.top_if(&head, &key, sources) else {
                        break;
                    };
                    at = next;
                    sources[at].pop_into(&mut accs);
                }
                rows.push(OutRow {
                    key,
                    start,
                    end,
                    accs,
                });
            }
            if window.sources.iter().all(|s| s.is_empty()) {
                let window = self.windows.pop_front().expect("front window");
                if let Some(db) = &self.db {
                    let mut batch = WriteBatch::default();
                    for (from, upto) in &window.deletes {
                        batch.delete_range(from, upto);
                    }
                    for s in window.sources {
                        if let Some(st) = s.stored
                            && st.delete
                        {
                            batch.delete_range(&st.prefix, &st.upto);
                        }
                    }
                    db.write_opt(batch, &unlogged()).map_err(db_error)?;
                }
            }
        }
        Ok(rows)
    }
}

impl PartEntries {
    fn fill(&mut self, db: Option<&DB>, aggs: usize) -> Result<()> {
        let (Some(st), Some(db)) = (&mut self.stored, db) else {
            return Ok(());
        };
        if !st.buffer.is_empty() || st.done {
            return Ok(());
        }
        let it = match &st.frozen {
            Some(frozen) => frozen.snapshot.raw_iterator(),
            None => db.raw_iterator(),
        };
        let buffer = &mut st.buffer;
        // Keys also in memory are older in the database.
        read_range(
            it,
            &st.prefix,
            (&mut st.next, &mut st.done),
            |key, value| {
                let (accs, _) = acc::decode(value, aggs)?;
                buffer.push_back((key.into(), accs.into_boxed_slice()));
                Ok(())
            },
        )
    }

    fn peek(&self) -> Option<&[u8]> {
        let m = self.memory.front_key();
        let d = self
            .stored
            .as_ref()
            .and_then(|s| s.buffer.front())
            .map(|(k, _)| k.as_ref());
        match (m, d) {
            (Some(m), Some(d)) => Some(m.min(d)),
            (m, d) => m.or(d),
        }
    }

    /// The entry with the smallest key; memory's where both have it (the stored one is
    /// older).
    fn pop(&mut self) -> KeyedAccs {
        if self.memory_first() {
            self.memory.pop_front().expect("a memory entry")
        } else {
            self.stored_pop()
        }
    }

    /// As [`PartEntries::pop`], merging the entry's accumulators into `into`.
    fn pop_into(&mut self, into: &mut [Acc]) {
        if self.memory_first() {
            self.memory.pop_front_into(into);
        } else {
            for (a, b) in into.iter_mut().zip(self.stored_pop().1.into_vec()) {
                a.merge(b);
            }
        }
    }

    /// Whether the smallest key is in memory; a stored entry of the same key is older and
    /// dropped.
    fn memory_first(&mut self) -> bool {
        match (
            self.memory.front_key(),
            self.stored.as_ref().and_then(|s| s.buffer.front()),
        ) {
            (Some(m), Some(d)) => match m.cmp(&d.0) {
                Cmp::Less => true,
                Cmp::Greater => false,
                Cmp::Equal => {
                    self.stored_pop();
                    true
                }
            },
            (Some(_), None) => true,
            _ => false,
        }
    }

    fn stored_pop(&mut self) -> KeyedAccs {
        self.stored
            .as_mut()
            .and_then(|s| s.buffer.pop_front())
            .expect("a stored entry")
    }

    fn is_empty(&self) -> bool {
        self.memory.is_empty()
            && self
                .stored
                .as_ref()
                .is_none_or(|s| s.buffer.is_empty() && s.done)
    }
}

/// Reads the next entries (at most 4,096) of the keys starting with `prefix`, from `next`
/// (the key after the prefix; the start when `None`), giving `take` each key after the
/// prefix and its value; then sets `next` past the last one read, or `done` when none was
/// left.
pub(super) fn read_range(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
    prefix: &[u8],
    (next, done): (&mut Option<Vec<u8>>, &mut bool),
    mut take: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    match next {
        Some(next) => it.seek([prefix, next.as_slice()].concat()),
        None => it.seek(prefix),
    }
    let mut last = None;
    for _ in 0..4096 {
        let Some(key) = it.key() else { break };
        let Some(key) = key.strip_prefix(prefix) else {
            break;
        };
        take(key, it.value().expect("a value at a key"))?;
        last = Some(key.to_vec());
        it.next();
    }
    it.status().map_err(db_error)?;
    match last {
        Some(mut k) => {
            // The key right after the last one read.
            k.push(0);
            *next = Some(k);
        }
        None => *done = true,
    }
    Ok(())
}

/// The first key after every key that starts with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            break;
        }
    }
    end
}

/// A point-in-time view of the state database that owns a handle to it: what a pane
/// still changing looked like when its windows closed.
pub(super) struct Frozen {
    // Declared first: released while the database it borrows is still open.
    snapshot: rocksdb::SnapshotWithThreadMode<'static, DB>,
    _db: Arc<StateDb>,
}

impl Frozen {
    pub(super) fn new(db: &Arc<StateDb>) -> Arc<Frozen> {
        let snapshot = db.snapshot();
        // SAFETY: the snapshot borrows the database inside `db`'s allocation, which `_db`
        // keeps alive, in place, for as long as the snapshot exists (fields drop in order).
        let snapshot = unsafe {
            std::mem::transmute::<
                rocksdb::SnapshotWithThreadMode<'_, DB>,
                rocksdb::SnapshotWithThreadMode<'static, DB>,
            >(snapshot)
        };
        Arc::new(Frozen {
            snapshot,
            _db: db.clone(),
        })
    }
}

/// A pane's entries in the database, for one window that holds it.
pub(super) struct StoredRange {
    pub(super) prefix: Vec<u8>,
    pub(super) upto: Vec<u8>,
    /// The pane's last window: its entries are deleted once it has been read.
    pub(super) delete: bool,
    /// Read from this snapshot (the pane still changes), else from the database.
    pub(super) frozen: Option<Arc<Frozen>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads order raw keys as their bytes do: keys that are another's start padded with
    /// zeros, keys of exactly 16 bytes, and longer ones sharing their first 16.
    #[test]
    fn heads_order_keys_as_their_bytes_do() {
        let sixteen = [7u8; 16];
        let keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"ab".to_vec(),
            b"ab\0".to_vec(),
            b"ab\0\0".to_vec(),
            b"ab\x01".to_vec(),
            sixteen.to_vec(),
            [&sixteen[..], &[0]].concat(),
            [&sixteen[..], &[0, 0]].concat(),
            [&sixteen[..], &[1]].concat(),
            [&sixteen[..15], &[0]].concat(),
            [&sixteen[..15], &[0, 9]].concat(),
        ];
        for a in &keys {
            for b in &keys {
                let (ha, hb) = (Head::new(a, 0), Head::new(b, 1));
                let got = ha.cmp_keys(&hb, || (a.as_slice(), b.as_slice()));
                assert_eq!(got, a.cmp(b), "{a:?} against {b:?}");
            }
        }
    }
}
