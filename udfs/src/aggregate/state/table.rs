//! A pane's entries: every key in one byte arena, every accumulator in one slab, and a
//! hash index of entry numbers.
//!
//! A hash map of boxed keys to boxed accumulators costs two allocations and a 41-byte slot
//! per entry; with Nexmark's keys in every partition, eight partitions held 3 million such
//! entries (~160 bytes each), went past the memory budget and spilled. Here an entry costs
//! its key bytes, its accumulators, an 8-byte key offset, a flag and a 4-byte slot, and
//! adding one allocates nothing but the vectors' amortised growth: fewer bytes to fault
//! in, nothing to free one by one, and a table that rehashes 4-byte slots.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::acc::Acc;
use super::closing::KeyedAccs;

#[derive(Default)]
pub(super) struct Table {
    /// Entry numbers, hashed by their keys.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// Where entry `i`'s key starts in `keys`; it ends where the next one starts.
    starts: Vec<u64>,
    keys: Vec<u8>,
    /// `width` accumulators per entry, in entry order.
    accs: Vec<Acc>,
    width: usize,
    /// Changed since the database last had the entry.
    dirty: Vec<bool>,
    /// Heap bytes the accumulators own (distinct sets, text), kept by the caller.
    pub(super) heap: usize,
}

impl Table {
    pub(super) fn len(&self) -> usize {
        self.starts.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The memory the table takes: its index (whose control bytes are all written) by
    /// capacity, its vectors by length (the spare capacity of a large vector is address
    /// space the allocator maps, not memory, until written), and the accumulators' heap.
    pub(super) fn bytes(&self) -> usize {
        self.index.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.starts.len() * std::mem::size_of::<u64>()
            + self.keys.len()
            + self.accs.len() * std::mem::size_of::<Acc>()
            + self.dirty.len()
            + self.heap
    }

    pub(super) fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(super) fn key(&self, i: usize) -> &[u8] {
        key_at(&self.starts, &self.keys, i)
    }

    pub(super) fn accs(&self, i: usize) -> &[Acc] {
        &self.accs[i * self.width..(i + 1) * self.width]
    }

    pub(super) fn is_dirty(&self, i: usize) -> bool {
        self.dirty[i]
    }

    /// The entry's accumulators, marked changed.
    pub(super) fn update(&mut self, i: usize) -> &mut [Acc] {
        self.dirty[i] = true;
        &mut self.accs[i * self.width..(i + 1) * self.width]
    }

    pub(super) fn clean(&mut self, i: usize) {
        self.dirty[i] = false;
    }

    pub(super) fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let (starts, keys) = (&self.starts, &self.keys);
        self.index
            .find(hash, |&i| key_at(starts, keys, i as usize) == key)
            .map(|&i| i as usize)
    }

    /// Adds an entry for a key not in the table (`hash` is [`Table::hash`] of it).
    pub(super) fn insert(&mut self, hash: u64, key: &[u8], accs: Vec<Acc>, dirty: bool) -> usize {
        if self.is_empty() {
            self.width = accs.len();
        }
        debug_assert_eq!(accs.len(), self.width);
        // The memory budget keeps a table far below 4 billion entries.
        let i = u32::try_from(self.len()).expect("fewer than 2^32 entries in a pane");
        self.starts.push(self.keys.len() as u64);
        self.keys.extend_from_slice(key);
        self.accs.extend(accs);
        self.dirty.push(dirty);
        let (starts, keys, hasher) = (&self.starts, &self.keys, &self.hasher);
        self.index.insert_unique(hash, i, |&j| {
            hasher.hash_one(key_at(starts, keys, j as usize))
        });
        i as usize
    }

    /// Keeps the entries `keep` says to, in their order, and gives the memory of the others
    /// back.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&[u8], &[Acc], bool) -> bool) {
        let n = self.len();
        let width = self.width;
        let mut kept = 0;
        let mut key_end = 0;
        for i in 0..n {
            let (start, end) = span(&self.starts, self.keys.len(), i);
            let accs = &self.accs[i * width..(i + 1) * width];
            if !keep(&self.keys[start..end], accs, self.dirty[i]) {
                continue;
            }
            if kept != i {
                self.keys.copy_within(start..end, key_end);
                for a in 0..width {
                    self.accs.swap(kept * width + a, i * width + a);
                }
                self.dirty[kept] = self.dirty[i];
            }
            self.starts[kept] = key_end as u64;
            key_end += end - start;
            kept += 1;
        }
        self.starts.truncate(kept);
        self.keys.truncate(key_end);
        self.accs.truncate(kept * width);
        self.dirty.truncate(kept);
        self.starts.shrink_to_fit();
        self.keys.shrink_to_fit();
        self.accs.shrink_to_fit();
        self.dirty.shrink_to_fit();
        self.reindex();
    }

    fn reindex(&mut self) {
        let (starts, keys, hasher) = (&self.starts, &self.keys, &self.hasher);
        let hash = |i: u32| hasher.hash_one(key_at(starts, keys, i as usize));
        self.index = HashTable::with_capacity(starts.len());
        for i in 0..starts.len() as u32 {
            self.index.insert_unique(hash(i), i, |&j| hash(j));
        }
    }

    /// The entries, moved out, in key order.
    pub(super) fn into_sorted(self) -> Vec<KeyedAccs> {
        let Table {
            starts, keys, accs, ..
        } = self;
        let width = self.width;
        let mut accs = accs.into_iter();
        let mut out: Vec<KeyedAccs> = (0..starts.len())
            .map(|i| {
                let key = key_at(&starts, &keys, i).into();
                (key, accs.by_ref().take(width).collect())
            })
            .collect();
        super::sort_by_key_bytes(&mut out);
        out
    }

    /// The entries, copied, in key order.
    pub(super) fn to_sorted(&self) -> Vec<KeyedAccs> {
        let mut out: Vec<KeyedAccs> = (0..self.len())
            .map(|i| (self.key(i).into(), self.accs(i).into()))
            .collect();
        super::sort_by_key_bytes(&mut out);
        out
    }
}

fn span(starts: &[u64], keys_len: usize, i: usize) -> (usize, usize) {
    let start = starts[i] as usize;
    let end = starts.get(i + 1).map_or(keys_len, |&e| e as usize);
    (start, end)
}

fn key_at<'a>(starts: &[u64], keys: &'a [u8], i: usize) -> &'a [u8] {
    let (start, end) = span(starts, keys.len(), i);
    &keys[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: i64) -> Vec<Acc> {
        vec![Acc::Count(n)]
    }

    #[test]
    fn finds_what_it_holds_and_keeps_what_retain_keeps() {
        let mut t = Table::default();
        let keys: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| format!("k{}", i * 7919 % 1000).into_bytes())
            .collect();
        for (n, k) in keys.iter().enumerate() {
            let h = t.hash(k);
            assert_eq!(t.find(h, k), None);
            t.insert(h, k, count(n as i64), n % 2 == 0);
        }
        assert_eq!(t.len(), 1000);
        for (n, k) in keys.iter().enumerate() {
            let i = t.find(t.hash(k), k).expect("inserted");
            assert_eq!(t.key(i), k.as_slice());
            assert!(matches!(t.accs(i), [Acc::Count(c)] if *c == n as i64));
            assert_eq!(t.is_dirty(i), n % 2 == 0);
        }
        let before = t.bytes();
        // Keys of different lengths move within the arena.
        t.retain(|k, _, _| k.len() != 3);
        assert!(t.bytes() < before);
        for (n, k) in keys.iter().enumerate() {
            let found = t.find(t.hash(k), k);
            if k.len() == 3 {
                assert_eq!(found, None);
            } else {
                let i = found.expect("kept");
                assert_eq!(t.key(i), k.as_slice());
                assert!(matches!(t.accs(i), [Acc::Count(c)] if *c == n as i64));
                assert_eq!(t.is_dirty(i), n % 2 == 0);
            }
        }
        let sorted = t.to_sorted();
        assert!(sorted.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(sorted.len(), t.len());
        let moved = t.into_sorted();
        assert_eq!(moved.len(), sorted.len());
        assert!(moved.iter().zip(&sorted).all(|(a, b)| a.0 == b.0));
    }
}
