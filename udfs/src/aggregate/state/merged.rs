//! Panes merged across partitions, once for all the windows that hold them.
//!
//! Each partition keeps its own panes (what lets its state move to another process), so a
//! key that is in every partition (Nexmark's auctions and bidders) is in every partition's
//! pane. Emitting a window then merged one source per pane and partition, key by key: 40
//! for Nexmark q5 (10 s windows sliding by 2 s) with 8 partitions, and each pane was merged
//! again in each of the `size / slide` windows holding it. Here the partitions' parts of a
//! pane are merged once, by hash, into one table that the pane's windows read: a window
//! merges one source per pane. The merged pane is kept for the pane's later windows while
//! none of its parts changed (a partition that changes its part takes it back as a new
//! table, see `PaneTable`, so the pointer tells).

use std::sync::Weak;

use super::*;

/// A pane's parts merged across partitions, for the pane's windows still to come.
pub(super) struct MergedPane {
    /// The partitions' parts it was made of: valid while each is still the table its
    /// partition holds. Weak, so that a part changed afterwards is not kept (the pointer
    /// stays unique while the weak reference lives).
    parts: Vec<Weak<Table>>,
    table: Arc<Table>,
    order: Arc<Vec<u32>>,
    /// What it takes in memory, counted in the stage's total while it is kept.
    bytes: usize,
}

/// One partition's part of a pane in an emission: its table, its key order (sorted by an
/// earlier emission, or to sort), and the windows of the emission that hold it.
pub(super) struct PaneOut {
    /// The pane's end.
    pub(super) pane: i64,
    pub(super) table: Arc<Table>,
    pub(super) order: Arc<OnceLock<Arc<Vec<u32>>>>,
    pub(super) windows: Vec<ClosingAt>,
    /// The pane left its partition with this emission (its last window is in it).
    pub(super) done: bool,
    /// Its range of the database, to delete after its last window (the last in
    /// `windows`): entries a checkpoint wrote that memory holds too.
    pub(super) delete: Option<(Vec<u8>, Vec<u8>)>,
}

/// A window a pane is emitted in: end, start, and the pane's entries in the database.
pub(super) type ClosingAt = (i64, i64, Option<StoredRange>);

impl AggregateState {
    /// Gives `closing` the panes of an emission (outside the partitions' locks). A pane
    /// that several partitions hold, in memory only, in the same windows of this
    /// emission, is one source: merged now, or merged by an earlier emission and
    /// unchanged since. Otherwise each part is a source, sorted once for all its windows.
    pub(super) fn add_panes(&self, closing: &mut Closing, panes: Vec<PaneOut>, through: i64) {
        let mut merged = self.merged.lock().expect("merged panes lock");
        let mut groups: BTreeMap<i64, Vec<PaneOut>> = BTreeMap::new();
        for pane in panes {
            groups.entry(pane.pane).or_default().push(pane);
        }
        for (pane, mut parts) in groups {
            for part in &mut parts {
                if let (Some(range), Some(&(end, start, _))) =
                    (part.delete.take(), part.windows.last())
                {
                    closing.delete_after(end, start, range);
                }
            }
            match self.merge_parts(&mut merged, pane, &parts) {
                Some((table, order)) => {
                    for &(end, start, _) in &parts[0].windows {
                        closing.add(end, start, (table.clone(), order.clone()), None);
                    }
                }
                None => {
                    for part in parts {
                        let order = part
                            .order
                            .get_or_init(|| Arc::new(closing::sorted(&part.table)))
                            .clone();
                        for (end, start, stored) in part.windows {
                            closing.add(end, start, (part.table.clone(), order.clone()), stored);
                        }
                    }
                }
            }
        }
        // Panes whose every window has closed are not needed again.
        let last = |pane: i64| self.last_window_of(pane);
        let gone: Vec<i64> = merged
            .keys()
            .copied()
            .filter(|&p| last(p) <= through)
            .collect();
        for pane in gone {
            self.forget_merged(&mut merged, pane);
        }
    }

    /// The pane's parts merged, with its key order: the one merged before if each part is
    /// still the table it was made of, else merged now. `None` where the parts are to be
    /// sources of their own: a single part, a part with entries in the database only, parts in
    /// different windows (partitions that emitted up to different points), or no room in
    /// the memory budget for the merged copy.
    fn merge_parts(
        &self,
        merged: &mut BTreeMap<i64, MergedPane>,
        pane: i64,
        parts: &[PaneOut],
    ) -> Option<(Arc<Table>, Arc<Vec<u32>>)> {
        let mergeable = parts.len() > 1
            && parts.iter().all(|p| {
                p.windows.len() == parts[0].windows.len()
                    && p.windows.iter().all(|w| w.2.is_none())
                    && p.windows
                        .iter()
                        .zip(&parts[0].windows)
                        .all(|(a, b)| a.0 == b.0)
            });
        if !mergeable {
            self.forget_merged(merged, pane);
            return None;
        }
        if let Some(m) = merged.get(&pane)
            && m.parts.len() == parts.len()
            && m.parts
                .iter()
                .zip(parts)
                .all(|(was, part)| std::ptr::eq(was.as_ptr(), Arc::as_ptr(&part.table)))
        {
            return Some((m.table.clone(), m.order.clone()));
        }
        self.forget_merged(merged, pane);
        // The merged copy and its order hold at most what the parts and theirs hold: they
        // must fit beside them.
        let bytes: usize = parts
            .iter()
            .map(|p| p.table.bytes() + order_bytes(p.table.len()))
            .sum();
        if self.memory.load(Ordering::Relaxed) + bytes as i64 > self.plan.budget as i64 {
            return None;
        }
        let table = merge_tables(parts.iter().map(|p| &*p.table).collect());
        let order = Arc::new(closing::sorted(&table));
        let table = Arc::new(table);
        // Kept for the pane's later windows: none when this emission holds its last.
        if !parts[0].done {
            let bytes = table.bytes() + order_bytes(order.len());
            self.memory.fetch_add(bytes as i64, Ordering::Relaxed);
            merged.insert(
                pane,
                MergedPane {
                    parts: parts.iter().map(|p| Arc::downgrade(&p.table)).collect(),
                    table: table.clone(),
                    order: order.clone(),
                    bytes,
                },
            );
        }
        Some((table, order))
    }

    /// Drops every merged pane (the stage is past its memory budget). Called with a
    /// partition's lock held: `add_panes` takes no partition lock while it holds these.
    pub(super) fn forget_all_merged(&self) {
        let mut merged = self.merged.lock().expect("merged panes lock");
        let panes: Vec<i64> = merged.keys().copied().collect();
        for pane in panes {
            self.forget_merged(&mut merged, pane);
        }
    }

    fn forget_merged(&self, merged: &mut BTreeMap<i64, MergedPane>, pane: i64) {
        if let Some(m) = merged.remove(&pane) {
            self.memory.fetch_sub(m.bytes as i64, Ordering::Relaxed);
        }
    }
}

/// One table of the keys of `tables`, each key's accumulators merged in the tables' order.
fn merge_tables(tables: Vec<&Table>) -> Table {
    // At least the largest part's keys (with keys in every partition, about as many).
    let mut merged = Table::default();
    merged.reserve(tables.iter().map(|t| t.len()).max().unwrap_or(0));
    for table in tables {
        merged.heap += table.heap;
        for i in 0..table.len() {
            let key = table.key(i);
            let hash = merged.hash(key);
            match merged.find(hash, key) {
                Some(j) => {
                    for (a, b) in merged.accs_mut(j).iter_mut().zip(table.accs(i)) {
                        a.merge_ref(b);
                    }
                }
                None => {
                    merged.insert(hash, key, table.accs(i).iter().cloned(), false);
                }
            }
        }
    }
    merged
}
