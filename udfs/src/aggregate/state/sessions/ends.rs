//! Sessions' end markers in memory.

use super::*;

/// End markers in memory: keys whose sessions may close at an end, grouped by the end.
/// Closing takes every key of the ends due at once; which key of one end comes first
/// does not matter (closed keys are grouped and sorted afterwards). A binary heap of
/// (end, key) cost a compare of keys where ends tie and about log2(sessions) cache misses
/// a key popped; many sessions end in the same millisecond.
#[derive(Default)]
pub(super) struct EndMarks {
    by_end: BTreeMap<i64, Vec<Key>>,
    len: usize,
}

impl EndMarks {
    pub(super) fn push(&mut self, end: i64, key: Key) {
        self.by_end.entry(end).or_default().push(key);
        self.len += 1;
    }

    pub(super) fn first(&self) -> Option<i64> {
        self.by_end.first_key_value().map(|(end, _)| *end)
    }

    /// The keys of the earliest end, if `through` closes it.
    pub(super) fn pop_closed(&mut self, through: i64) -> Option<Vec<Key>> {
        let entry = self.by_end.first_entry()?;
        if !session_closed(*entry.key(), through) {
            return None;
        }
        let keys = entry.remove();
        self.len -= keys.len();
        Some(keys)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}
