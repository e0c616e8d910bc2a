//! A partition's state in the database: evicting its oldest windows (then sessions) past
//! the memory budget, and writing what changed at a checkpoint.

use super::*;

impl PartState {
    /// Writes and drops entries, oldest windows first, then keys' sessions, until about
    /// `target` bytes are free (`emitted`: what the partition has emitted). Returns the
    /// entries and keys written out; `mem` is the partition's memory after.
    pub(super) fn evict(&mut self, db: &DB, target: usize, emitted: i64) -> Result<u64> {
        let mut freed = 0usize;
        let mut filters = 0usize;
        let mut entries = 0u64;
        let mut batch = WriteBatch::default();
        let mut value = Vec::new();
        for (end, window) in self.windows.iter_mut() {
            if freed >= target {
                break;
            }
            let mut key = self.prefix.clone();
            key.extend_from_slice(&ordered(*end));
            let base = key.len();
            // Entries leave and the others move down: a key order of them no longer holds.
            if let Some(order) = window.order.take() {
                freed += order.bytes();
            }
            let filter = &mut window.filter;
            let table = window.entries.to_mut();
            let mut filter_bytes = 0;
            let before = table.bytes();
            // What leaving frees, as it goes: an entry's share of the vectors and index,
            // and its accumulators' heap (the table gives the memory back at the end).
            let share = before.saturating_sub(table.heap) / table.len().max(1);
            let mut estimate = freed;
            let mut heap = 0;
            table.retain(|k, accs, dirty| {
                if estimate >= target {
                    return true;
                }
                if !filter.may_contain(k) {
                    filter_bytes += filter.insert(k);
                }
                if dirty {
                    key.truncate(base);
                    key.extend_from_slice(k);
                    value.clear();
                    acc::encode(accs, &mut value);
                    batch.put(&key, &value);
                }
                let h = accs.iter().map(Acc::heap_size).sum::<usize>();
                heap += h;
                estimate += share + h;
                entries += 1;
                false
            });
            table.heap = table.heap.saturating_sub(heap);
            freed += before.saturating_sub(table.bytes());
            window.evicted = true;
            window.stored = true;
            // The filter stays while the window is open: it counts against the budget.
            filters += filter_bytes;
            if batch.size_in_bytes() > WRITE_BATCH_BYTES {
                db.write_opt(std::mem::take(&mut batch), &unlogged())
                    .map_err(db_error)?;
            }
        }
        db.write_opt(batch, &unlogged()).map_err(db_error)?;
        self.mem = (self.mem + filters).saturating_sub(freed);
        if freed < target {
            entries += self
                .sessions
                .evict(db, target - freed, emitted, &mut self.mem)?;
        }
        Ok(entries)
    }

    pub(super) fn snapshot(
        &mut self,
        db: &DB,
        emitted: i64,
        id: u32,
        stats: &mut SnapshotStats,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        let mut value = Vec::new();
        let flush = |batch: &mut WriteBatch, stats: &mut SnapshotStats, force: bool| {
            if force || batch.size_in_bytes() > WRITE_BATCH_BYTES {
                stats.bytes += batch.size_in_bytes() as u64;
                db.write_opt(std::mem::take(batch), &unlogged())
                    .map_err(db_error)
            } else {
                Ok(())
            }
        };
        for (end, window) in self.windows.iter_mut() {
            let mut key = self.prefix.clone();
            key.extend_from_slice(&ordered(*end));
            let base = key.len();
            for i in 0..window.entries.len() {
                if !window.entries.is_dirty(i) {
                    continue;
                }
                // Taken back (from an emission reading the pane) only where it changes.
                let table = window.entries.to_mut();
                key.truncate(base);
                key.extend_from_slice(table.key(i));
                value.clear();
                acc::encode(table.accs(i), &mut value);
                batch.put(&key, &value);
                table.clean(i);
                stats.keys += 1;
                window.stored = true;
                flush(&mut batch, stats, false)?;
            }
        }
        self.sessions
            .snapshot(emitted, &mut batch, stats, &mut |b, s| flush(b, s, false))?;
        if std::mem::take(&mut self.meta_dirty) {
            let mut meta = Vec::with_capacity(28);
            meta.extend_from_slice(&self.max_time.to_le_bytes());
            meta.extend_from_slice(&self.seq.to_le_bytes());
            meta.extend_from_slice(&emitted.to_le_bytes());
            meta.extend_from_slice(&id.to_le_bytes());
            batch.put(&self.meta_key, &meta);
        }
        flush(&mut batch, stats, true)
    }
}
