//! A pane's entries: keys in byte blocks, accumulators in chunks, and a hash index of
//! entry numbers.
//!
//! A hash map of boxed keys to boxed accumulators costs two allocations and a 41-byte slot
//! per entry; with Nexmark's keys in every partition, eight partitions held 3 million such
//! entries (~160 bytes each), went past the memory budget and spilled. Here an entry costs
//! its key bytes, its accumulators, a 12-byte key location, a flag and a 4-byte slot, and
//! adding one allocates nothing but, now and then, a chunk. Chunks have fixed sizes
//! (growing from 16 entries to 4,096) and are never copied into larger ones: a vector that
//! doubles peaks at three times its size while it copies, and its freed halves stay with
//! the allocator (a million keys under a 32 MiB budget took 100 MiB more that way).

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use hashbrown::{DefaultHashBuilder, HashTable};

use super::Window;
use super::acc::Acc;

/// Entries in the first chunk; each next chunk holds four times more, up to [`MAX_CHUNK`].
const FIRST_CHUNK: usize = 16;
const MAX_CHUNK: usize = 4096;
/// Key bytes in the first block; blocks grow four times up to [`MAX_BLOCK`] (a larger key
/// gets a block of its own size).
const FIRST_BLOCK: usize = 256;
const MAX_BLOCK: usize = 64 * 1024;

#[derive(Default)]
pub(super) struct Table {
    /// Entry numbers, hashed by their keys.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    chunks: Vec<Chunk>,
    blocks: Vec<Vec<u8>>,
    len: usize,
    /// Accumulators per entry.
    width: usize,
    /// Bytes of the chunks and key blocks, as allocated.
    allocated: usize,
    /// Heap bytes the accumulators own (distinct sets, text), kept by the caller.
    pub(super) heap: usize,
}

/// A copy that goes on as the original: every chunk and key block allocated at the size
/// the original's has, so `allocated` counts it as it is and what is added to it goes in
/// place. (A vector's `clone` allocates its length only: a copied pane that gained a key
/// grew its last chunk by doubling, beyond its count, and eviction then took more off the
/// count than was on it.)
impl Clone for Table {
    fn clone(&self) -> Self {
        Table {
            index: self.index.clone(),
            hasher: self.hasher.clone(),
            chunks: self
                .chunks
                .iter()
                .map(|c| Chunk {
                    keys: clone_full(&c.keys),
                    accs: clone_full(&c.accs),
                    dirty: clone_full(&c.dirty),
                })
                .collect(),
            blocks: self.blocks.iter().map(clone_full).collect(),
            len: self.len,
            width: self.width,
            allocated: self.allocated,
            heap: self.heap,
        }
    }
}

/// A copy of `v` with `v`'s capacity.
fn clone_full<T: Clone>(v: &Vec<T>) -> Vec<T> {
    let mut copy = Vec::with_capacity(v.capacity());
    copy.extend_from_slice(v);
    copy
}

/// Entries, in order: where each key is, its accumulators, and whether it changed since
/// the database last had it. Allocated at its full size and never grown.
struct Chunk {
    keys: Vec<KeyAt>,
    accs: Vec<Acc>,
    dirty: Vec<bool>,
}

#[derive(Clone, Copy)]
struct KeyAt {
    block: u32,
    offset: u32,
    len: u32,
}

/// A pane's table: its own, or shared with an emission that reads it while later windows
/// still need the pane. The first change after that takes it back: moved where the
/// emission is done with it, copied only where it still reads it. (Every emission of a
/// sliding window copied the `size / slide - 1` panes it leaves open, of every partition,
/// under their locks; a pane behind the watermark is seldom changed again.)
pub(super) enum PaneTable {
    Owned(Table),
    Shared(Arc<Table>),
}

impl Default for PaneTable {
    fn default() -> Self {
        PaneTable::Owned(Table::default())
    }
}

impl std::ops::Deref for PaneTable {
    type Target = Table;

    fn deref(&self) -> &Table {
        match self {
            PaneTable::Owned(table) => table,
            PaneTable::Shared(table) => table,
        }
    }
}

impl PaneTable {
    /// The table to change.
    #[inline]
    pub(super) fn to_mut(&mut self) -> &mut Table {
        if let PaneTable::Shared(shared) = self {
            let shared = std::mem::take(shared);
            *self = PaneTable::Owned(Arc::unwrap_or_clone(shared));
        }
        match self {
            PaneTable::Owned(table) => table,
            PaneTable::Shared(_) => unreachable!("taken back above"),
        }
    }

    /// The table for an emission to read while the pane stays.
    pub(super) fn share(&mut self) -> Arc<Table> {
        if let PaneTable::Owned(table) = self {
            *self = PaneTable::Shared(Arc::new(std::mem::take(table)));
        }
        match self {
            PaneTable::Shared(table) => table.clone(),
            PaneTable::Owned(_) => unreachable!("shared above"),
        }
    }

    /// The table, for an emission that takes the pane out of the state.
    pub(super) fn into_shared(self) -> Arc<Table> {
        match self {
            PaneTable::Owned(table) => Arc::new(table),
            PaneTable::Shared(table) => table,
        }
    }
}

/// A pane's entries in key order, as sorted for an emission (outside the partition's lock,
/// into a cell the pane shares), with the number of entries it covers.
#[derive(Clone)]
pub(super) struct KeyOrder {
    pub(super) cell: Arc<OnceLock<Arc<Vec<u32>>>>,
    pub(super) len: usize,
}

impl KeyOrder {
    fn new(len: usize) -> Self {
        KeyOrder {
            cell: Arc::default(),
            len,
        }
    }

    /// What it takes in memory (counted from when it is made: it is filled later).
    pub(super) fn bytes(&self) -> usize {
        order_bytes(self.len)
    }
}

/// What a key order of `len` entries takes.
pub(super) fn order_bytes(len: usize) -> usize {
    len * std::mem::size_of::<u32>()
}

impl Window {
    /// The pane's key order for an emission that takes its entries now: the one sorted
    /// before while it still covers them, else a new one to sort. `mem`: the partition's.
    pub(super) fn key_order(&mut self, mem: &mut usize) -> KeyOrder {
        let len = self.entries.len();
        match &self.order {
            Some(order) if order.len == len => order.clone(),
            _ => {
                self.forget_order(mem);
                let order = KeyOrder::new(len);
                *mem += order.bytes();
                self.order = Some(order.clone());
                order
            }
        }
    }

    /// The pane's key order for an emission that takes its entries out of the state: the
    /// one sorted before while it still covers them, else a new one to sort; no longer
    /// counted in `mem`.
    pub(super) fn take_order(&mut self, mem: &mut usize) -> KeyOrder {
        let len = self.entries.len();
        self.forget_order(mem)
            .filter(|order| order.len == len)
            .unwrap_or_else(|| KeyOrder::new(len))
    }

    /// Drops the key order (entries moved or left).
    fn forget_order(&mut self, mem: &mut usize) -> Option<KeyOrder> {
        let order = self.order.take()?;
        *mem = mem.saturating_sub(order.bytes());
        Some(order)
    }
}

/// The chunk and place of entry `i`.
#[inline]
fn locate(i: usize) -> (usize, usize) {
    // The chunks before the first of the largest size: 16 + 64 + 256 + 1024 entries.
    const SMALL: usize = FIRST_CHUNK * (1 + 4 + 16 + 64);
    const SMALL_CHUNKS: usize = 4;
    const _: () = assert!(FIRST_CHUNK << (2 * SMALL_CHUNKS) == MAX_CHUNK);
    if i >= SMALL {
        let i = i - SMALL;
        return (SMALL_CHUNKS + i / MAX_CHUNK, i % MAX_CHUNK);
    }
    // Chunk c starts at 16 (4^c - 1) / 3: i is in the last c with 16 * 4^c <= 3i + 16.
    let chunk = ((3 * i + FIRST_CHUNK) / FIRST_CHUNK).ilog2() as usize / 2;
    let start = FIRST_CHUNK * ((1 << (2 * chunk)) - 1) / 3;
    (chunk, i - start)
}

fn chunk_bytes(chunk: &Chunk) -> usize {
    chunk.keys.capacity() * std::mem::size_of::<KeyAt>()
        + chunk.accs.capacity() * std::mem::size_of::<Acc>()
        + chunk.dirty.capacity()
}

fn chunk_size(chunk: usize) -> usize {
    grown(FIRST_CHUNK, chunk, MAX_CHUNK)
}

/// The size of the `n`th of a run of allocations that start at `first` and grow four
/// times each up to `max`.
fn grown(first: usize, n: usize, max: usize) -> usize {
    first.checked_shl(2 * n as u32).map_or(max, |s| s.min(max))
}

impl Table {
    /// Makes room in the index for `keys` more entries (growing on its own, it doubles,
    /// and reads every key it holds again to hash it each time).
    pub(super) fn reserve(&mut self, keys: usize) {
        let rehash = rehasher(&self.chunks, &self.blocks, &self.hasher);
        self.index.reserve(keys, rehash);
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory the table takes: its index, chunks and key blocks as allocated, and the
    /// accumulators' heap.
    pub(super) fn bytes(&self) -> usize {
        self.index.capacity() * (std::mem::size_of::<u32>() + 1) + self.allocated + self.heap
    }

    /// [`Table::bytes`] counted again from the allocations and the accumulators, rather
    /// than from the running counts (tests).
    #[cfg(test)]
    pub(super) fn recount(&self) -> usize {
        self.index.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.chunks.iter().map(chunk_bytes).sum::<usize>()
            + self.blocks.iter().map(Vec::capacity).sum::<usize>()
            + self
                .chunks
                .iter()
                .flat_map(|c| &c.accs)
                .map(Acc::heap_size)
                .sum::<usize>()
    }

    pub(super) fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(super) fn key(&self, i: usize) -> &[u8] {
        key_at(&self.chunks, &self.blocks, i)
    }

    pub(super) fn accs(&self, i: usize) -> &[Acc] {
        let (c, j) = locate(i);
        &self.chunks[c].accs[j * self.width..(j + 1) * self.width]
    }

    pub(super) fn is_dirty(&self, i: usize) -> bool {
        let (c, j) = locate(i);
        self.chunks[c].dirty[j]
    }

    /// The entry's accumulators, marked changed.
    pub(super) fn update(&mut self, i: usize) -> &mut [Acc] {
        let (c, j) = locate(i);
        let chunk = &mut self.chunks[c];
        chunk.dirty[j] = true;
        &mut chunk.accs[j * self.width..(j + 1) * self.width]
    }

    pub(super) fn clean(&mut self, i: usize) {
        let (c, j) = locate(i);
        self.chunks[c].dirty[j] = false;
    }

    pub(super) fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let (chunks, blocks) = (&self.chunks, &self.blocks);
        self.index
            .find(hash, |&i| key_at(chunks, blocks, i as usize) == key)
            .map(|&i| i as usize)
    }

    /// Adds an entry for a key not in the table (`hash` is [`Table::hash`] of it).
    pub(super) fn insert(
        &mut self,
        hash: u64,
        key: &[u8],
        accs: impl IntoIterator<Item = Acc, IntoIter: ExactSizeIterator>,
        dirty: bool,
    ) -> usize {
        let accs = accs.into_iter();
        if self.is_empty() {
            self.width = accs.len();
        }
        debug_assert_eq!(accs.len(), self.width);
        // The memory budget keeps a table far below 4 billion entries.
        let i = u32::try_from(self.len).expect("fewer than 2^32 entries in a pane");
        let at = self.store_key(key);
        let (c, _) = locate(self.len);
        if c == self.chunks.len() {
            let size = chunk_size(c);
            let chunk = Chunk {
                keys: Vec::with_capacity(size),
                accs: Vec::with_capacity(size * self.width),
                dirty: Vec::with_capacity(size),
            };
            self.allocated += chunk_bytes(&chunk);
            self.chunks.push(chunk);
        }
        let chunk = &mut self.chunks[c];
        chunk.keys.push(at);
        chunk.accs.extend(accs);
        chunk.dirty.push(dirty);
        self.len += 1;
        self.index_entry(hash, i);
        i as usize
    }

    /// Puts entry `i`, whose key hashes to `hash`, in the index.
    fn index_entry(&mut self, hash: u64, i: u32) {
        let rehash = rehasher(&self.chunks, &self.blocks, &self.hasher);
        self.index.insert_unique(hash, i, rehash);
    }

    fn store_key(&mut self, key: &[u8]) -> KeyAt {
        let fits = self
            .blocks
            .last()
            .is_some_and(|b| b.capacity() - b.len() >= key.len());
        if !fits {
            let size = grown(FIRST_BLOCK, self.blocks.len(), MAX_BLOCK);
            let block = Vec::with_capacity(size.max(key.len()));
            self.allocated += block.capacity();
            self.blocks.push(block);
        }
        let block = self.blocks.len() - 1;
        let b = &mut self.blocks[block];
        let at = KeyAt {
            block: block as u32,
            offset: b.len() as u32,
            len: key.len() as u32,
        };
        b.extend_from_slice(key);
        at
    }

    /// Keeps the entries `keep` says to, in their order, and gives the memory of the others
    /// back. Done in place: kept entries move down over dropped ones (keys within their
    /// blocks, which hold them in entry order), the chunks and blocks left empty are freed
    /// and the index is rebuilt. Eviction shrinks a table past the memory budget this way
    /// without holding a second copy of it, and without fresh memory for the copy.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&[u8], &[Acc], bool) -> bool) {
        let width = self.width;
        // Where the next kept entry goes, and where its key goes.
        let mut kept = 0;
        let (mut wb, mut wo) = (0usize, 0usize);
        for i in 0..self.len {
            let (c, j) = locate(i);
            let at = self.chunks[c].keys[j];
            let chunk = &self.chunks[c];
            if !keep(
                block_key(&self.blocks, at),
                &chunk.accs[j * width..(j + 1) * width],
                chunk.dirty[j],
            ) {
                continue;
            }
            // The key: at the write position, or at the start of the next block that
            // holds it (at the latest its own block, where it is now).
            let (rb, ro, len) = (at.block as usize, at.offset as usize, at.len as usize);
            while wb < rb && self.blocks[wb].capacity() - wo < len {
                self.blocks[wb].truncate(wo);
                wb += 1;
                wo = 0;
            }
            if wb == rb {
                self.blocks[rb].copy_within(ro..ro + len, wo);
            } else {
                let (to, from) = self.blocks.split_at_mut(rb);
                to[wb].truncate(wo);
                to[wb].extend_from_slice(&from[0][ro..ro + len]);
            }
            let moved = KeyAt {
                block: wb as u32,
                offset: wo as u32,
                len: at.len,
            };
            wo += len;
            // The entry: swapped with the one at the write position (dropped, or kept
            // and already moved), which is at or before it.
            let (wc, wj) = locate(kept);
            if wc == c && wj != j {
                let chunk = &mut self.chunks[c];
                chunk.dirty.swap(wj, j);
                let (to, from) = chunk.accs.split_at_mut(j * width);
                to[wj * width..(wj + 1) * width].swap_with_slice(&mut from[..width]);
            } else if wc != c {
                let (head, tail) = self.chunks.split_at_mut(c);
                let (to, from) = (&mut head[wc], &mut tail[0]);
                std::mem::swap(&mut to.dirty[wj], &mut from.dirty[j]);
                to.accs[wj * width..(wj + 1) * width]
                    .swap_with_slice(&mut from.accs[j * width..(j + 1) * width]);
            }
            self.chunks[wc].keys[wj] = moved;
            kept += 1;
        }
        // What is past the kept entries and keys goes.
        let dropped_entries = self.len - kept;
        self.len = kept;
        let chunks = if kept == 0 { 0 } else { locate(kept - 1).0 + 1 };
        for chunk in self.chunks.drain(chunks..) {
            self.allocated -= chunk_bytes(&chunk);
        }
        if let Some(last) = self.chunks.last_mut() {
            let j = locate(kept - 1).1 + 1;
            last.keys.truncate(j);
            last.accs.truncate(j * width);
            last.dirty.truncate(j);
        }
        let blocks = if kept == 0 { 0 } else { wb + 1 };
        if let Some(b) = self.blocks.get_mut(wb) {
            b.truncate(wo);
        }
        for block in self.blocks.drain(blocks..) {
            self.allocated -= block.capacity();
        }
        if dropped_entries > 0 {
            self.index.clear();
            // Empty: nothing to hash.
            self.index.shrink_to(kept, |_| 0);
            for i in 0..kept {
                self.index_entry(self.hash(self.key(i)), i as u32);
            }
        }
    }

    pub(super) fn accs_mut(&mut self, i: usize) -> &mut [Acc] {
        let (c, j) = locate(i);
        &mut self.chunks[c].accs[j * self.width..(j + 1) * self.width]
    }

    /// The entry's accumulators, moved out (the table keeps placeholders).
    pub(super) fn take_accs(&mut self, i: usize) -> Box<[Acc]> {
        self.accs_mut(i).iter_mut().map(std::mem::take).collect()
    }

    /// Asks the CPU to load entry `i`'s key location and accumulators: emission reads
    /// entries in key order, which is no order in memory, and a read that waits for
    /// memory costs more than the rest of the row.
    pub(super) fn prefetch_entry(&self, i: usize) {
        let (c, j) = locate(i);
        if let Some(chunk) = self.chunks.get(c) {
            prefetch(chunk.keys.as_ptr().wrapping_add(j));
            prefetch(chunk.accs.as_ptr().wrapping_add(j * self.width));
        }
    }

    /// Asks the CPU to load entry `i`'s key bytes (its location read, so loaded first).
    pub(super) fn prefetch_key(&self, i: usize) {
        let (c, j) = locate(i);
        if let Some(at) = self.chunks.get(c).and_then(|chunk| chunk.keys.get(j))
            && let Some(block) = self.blocks.get(at.block as usize)
        {
            prefetch(block.as_ptr().wrapping_add(at.offset as usize));
        }
    }
}

#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and faults on no address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn block_key(blocks: &[Vec<u8>], at: KeyAt) -> &[u8] {
    let start = at.offset as usize;
    &blocks[at.block as usize][start..start + at.len as usize]
}

/// The hash of an entry number's key, for the index when it grows.
fn rehasher<'a>(
    chunks: &'a [Chunk],
    blocks: &'a [Vec<u8>],
    hasher: &'a DefaultHashBuilder,
) -> impl Fn(&u32) -> u64 + 'a {
    move |&j| hasher.hash_one(key_at(chunks, blocks, j as usize))
}

fn key_at<'a>(chunks: &[Chunk], blocks: &'a [Vec<u8>], i: usize) -> &'a [u8] {
    let (c, j) = locate(i);
    block_key(blocks, chunks[c].keys[j])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: i64) -> Vec<Acc> {
        vec![Acc::Count(n)]
    }

    #[test]
    fn entries_are_placed_in_chunks_of_growing_size() {
        let mut expected = Vec::new();
        for chunk in 0..8 {
            expected.extend((0..chunk_size(chunk)).map(|j| (chunk, j)));
        }
        let placed: Vec<_> = (0..expected.len()).map(locate).collect();
        assert_eq!(placed, expected);
        assert_eq!(chunk_size(7), MAX_CHUNK);
    }

    #[test]
    fn finds_what_it_holds_and_keeps_what_retain_keeps() {
        let mut t = Table::default();
        // Enough entries for chunks of every size, and one key larger than a block.
        let mut keys: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| format!("k{}", i * 7919 % 20_000).into_bytes())
            .collect();
        keys.push(vec![7; MAX_BLOCK + 1]);
        for (n, k) in keys.iter().enumerate() {
            let h = t.hash(k);
            assert_eq!(t.find(h, k), None);
            t.insert(h, k, count(n as i64), n % 2 == 0);
        }
        assert_eq!(t.len(), keys.len());
        for (n, k) in keys.iter().enumerate() {
            let i = t.find(t.hash(k), k).expect("inserted");
            assert_eq!(t.key(i), k.as_slice());
            assert!(matches!(t.accs(i), [Acc::Count(c)] if *c == n as i64));
            assert_eq!(t.is_dirty(i), n % 2 == 0);
        }
        let before = t.bytes();
        t.retain(|k, _, _| k.len() != 5);
        assert!(t.bytes() < before);
        for (n, k) in keys.iter().enumerate() {
            let found = t.find(t.hash(k), k);
            if k.len() == 5 {
                assert_eq!(found, None);
            } else {
                let i = found.expect("kept");
                assert_eq!(t.key(i), k.as_slice());
                assert!(matches!(t.accs(i), [Acc::Count(c)] if *c == n as i64));
                assert_eq!(t.is_dirty(i), n % 2 == 0);
            }
        }
        // It goes on after a retain, and retains again.
        let len = t.len();
        for k in [b"new-1".as_slice(), b"new-2"] {
            t.insert(t.hash(k), k, count(-1), true);
        }
        assert_eq!(t.len(), len + 2);
        t.retain(|k, _, _| k.len() != 6);
        for k in &keys {
            assert_eq!(t.find(t.hash(k), k).is_some(), k.len() < 5 || k.len() > 6);
        }
        for k in [b"new-1".as_slice(), b"new-2"] {
            let i = t.find(t.hash(k), k).expect("inserted after a retain");
            assert_eq!(t.key(i), k);
            assert!(matches!(t.accs(i), [Acc::Count(-1)]));
        }
        let before = t.bytes();
        t.retain(|_, _, _| false);
        assert!(t.is_empty() && t.bytes() < before);
        let i = t.insert(t.hash(b"k7"), b"k7", count(3753), false);
        assert_eq!(t.find(t.hash(b"k7"), b"k7"), Some(i));
        let copy = t.clone();
        assert!(matches!(&*t.take_accs(i), [Acc::Count(_)]));
        assert_eq!(copy.accs(i), &[Acc::Count(3753)][..], "{:?}", copy.accs(i));
    }

    /// A copy (a pane taken back from an emission that still reads it) counts what it
    /// allocates, keeps its chunks and blocks from growing as it gains keys, and gives
    /// back exactly what it counted when everything leaves.
    #[test]
    fn a_copy_goes_on_within_its_count() {
        let mut t = Table::default();
        // The last chunk (4,096 entries) part full, the last key block too.
        for n in 0..3_000u32 {
            let k = format!("key-{n}");
            t.insert(t.hash(k.as_bytes()), k.as_bytes(), count(1), true);
        }
        let mut copy = t.clone();
        assert_eq!(copy.bytes(), t.bytes());
        let capacities = |t: &Table| -> Vec<usize> {
            let chunks = t
                .chunks
                .iter()
                .flat_map(|c| [c.keys.capacity(), c.accs.capacity(), c.dirty.capacity()]);
            chunks.chain(t.blocks.iter().map(Vec::capacity)).collect()
        };
        assert_eq!(capacities(&copy), capacities(&t));
        for n in 3_000..4_000u32 {
            let k = format!("key-{n}");
            copy.insert(copy.hash(k.as_bytes()), k.as_bytes(), count(1), true);
        }
        let allocated: usize = copy.chunks.iter().map(chunk_bytes).sum::<usize>()
            + copy.blocks.iter().map(Vec::capacity).sum::<usize>();
        assert_eq!(copy.allocated, allocated);
        copy.retain(|_, _, _| false);
        assert_eq!(copy.allocated, 0);
    }
}
