//! A partition's state in the database: evicting its oldest windows past the memory
//! budget, and writing what changed at a checkpoint.

use super::*;

impl PartState {
    /// Writes and drops entries, oldest windows first, until about `target` bytes are free.
    pub(super) fn evict(&mut self, db: &DB, target: usize) -> Result<(usize, u64)> {
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
            let filter = &mut window.filter;
            let mut filter_bytes = 0;
            window.entries.retain(|k, e| {
                if freed >= target {
                    return true;
                }
                if !filter.may_contain(k) {
                    filter_bytes += filter.insert(k);
                }
                if e.dirty {
                    key.truncate(base);
                    key.extend_from_slice(k);
                    value.clear();
                    acc::encode(&e.accs, &mut value);
                    batch.put(&key, &value);
                }
                freed += entry_size(k, &e.accs);
                entries += 1;
                false
            });
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
        Ok((freed.saturating_sub(filters), entries))
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
            for (k, e) in window.entries.iter_mut().filter(|(_, e)| e.dirty) {
                key.truncate(base);
                key.extend_from_slice(k);
                value.clear();
                acc::encode(&e.accs, &mut value);
                batch.put(&key, &value);
                e.dirty = false;
                stats.keys += 1;
                window.stored = true;
                flush(&mut batch, stats, false)?;
            }
        }
        self.sessions
            .snapshot(&self.session_prefix, &mut batch, stats, &mut |b, s| {
                flush(b, s, false)
            })?;
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
