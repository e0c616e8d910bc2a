//! The engine's handle on the state ([`StageState`]): restore at start-up, assignments and
//! revocations as partitions move, take-overs, snapshots at checkpoints; and a partition's
//! end, for good or continued in the partitions that follow it.

use super::*;

impl StageState for AggregateState {
    fn restore(&self, db: Arc<StateDb>) -> Result<()> {
        let meta_prefix = self.key_prefix(b'm', "");
        let mut parts = BTreeMap::new();
        for item in db.prefix_iterator(&meta_prefix) {
            let (key, value) = item.map_err(db_error)?;
            let Some(name) = key.strip_prefix(meta_prefix.as_slice()) else {
                break;
            };
            let name: Arc<str> = String::from_utf8_lossy(name).into();
            // Counted in the watermark until it is assigned, or idle: a partition this
            // process will be assigned after a restart must not find its windows emitted
            // without it. Not emitted, judged or read before it is assigned: another
            // process may own it now.
            let part = self.load_part(&db, &name, &value)?;
            part.active.store(false, Ordering::Relaxed);
            part.restored.store(true, Ordering::Relaxed);
            parts.insert(name, Arc::new(part));
        }
        *self.parts.write().expect("parts lock") = parts;
        self.db
            .set(db)
            .map_err(|_| Error::Internal("aggregate state restored twice".into()))
    }

    fn assign(&self, partition: &PartitionInfo) {
        // A partition released earlier and assigned again: its state is in the database.
        if let Some(db) = self.db.get()
            && !self
                .parts
                .read()
                .expect("parts lock")
                .contains_key(&partition.name)
        {
            match db.get(self.key_prefix(b'm', &partition.name)) {
                Ok(Some(meta)) => match self.load_part(db, &partition.name, &meta) {
                    Ok(part) => {
                        self.parts
                            .write()
                            .expect("parts lock")
                            .entry(partition.name.clone())
                            .or_insert_with(|| Arc::new(part));
                    }
                    Err(e) => {
                        tracing::error!(partition = %partition.name, error = %e, "cannot read the partition's aggregate state")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(partition = %partition.name, error = %e, "cannot read the partition's aggregate state")
                }
            }
        }
        let part = self.part(partition);
        part.last_data.store(self.now(), Ordering::Relaxed);
        // The executor gives this turn's lag next (`watch`); the last turn's is stale.
        *part.lag.lock().expect("lag lock") = None;
        part.revoked.store(false, Ordering::Release);
        part.continued.store(NOT_CONTINUED, Ordering::Release);
        part.restored.store(false, Ordering::Release);
        part.active.store(true, Ordering::Release);
    }

    fn watch(&self, partition: &PartitionInfo, lag: &Arc<PartitionLag>) {
        let part = self.part(partition);
        *part.lag.lock().expect("lag lock") = Some(lag.clone());
    }

    fn follows(&self, partition: &PartitionInfo, parents: &[Arc<str>]) {
        self.follow(partition, parents);
    }

    fn assignments_done(&self) {
        // Restored partitions not assigned by now never will be: not this process's.
        let stale: Vec<Arc<str>> = self
            .parts
            .read()
            .expect("parts lock")
            .iter()
            .filter(|(_, p)| p.restored_unassigned())
            .map(|(name, _)| name.clone())
            .collect();
        self.drop_stale(&stale);
    }

    fn revoke(&self, partition: &PartitionInfo) {
        if let Some(p) = self.parts.read().expect("parts lock").get(&partition.name) {
            p.revoked.store(true, Ordering::Release);
        }
    }

    fn release(&self, partition: &PartitionInfo) {
        // Its state is in the checkpoint just committed; the next owner reads it there.
        // Assigned again meanwhile (revoke and assign come in order from one task): kept.
        let mut parts = self.parts.write().expect("parts lock");
        let revoked = parts
            .get(&partition.name)
            .is_some_and(|p| p.revoked.load(Ordering::Acquire));
        if !revoked {
            return;
        }
        if let Some(part) = parts.remove(&partition.name) {
            let st = part.state.lock().expect("partition lock");
            self.memory.fetch_sub(st.mem as i64, Ordering::Relaxed);
        }
    }

    fn partition_keys(&self, partition: &str) -> PartitionKeys {
        PartitionKeys {
            prefixes: vec![
                self.key_prefix(b'w', partition),
                self.key_prefix(b's', partition),
                self.key_prefix(b'e', partition),
            ],
            keys: vec![self.key_prefix(b'm', partition)],
        }
    }

    fn forget(&self, partition: &str) {
        // Not read here now (it is being assigned): what memory holds is an older state
        // than the one just taken over, loaded at start-up or kept from an earlier turn.
        if let Some(part) = self.parts.write().expect("parts lock").remove(partition) {
            let st = part.state.lock().expect("partition lock");
            self.memory.fetch_sub(st.mem as i64, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Result<SnapshotStats> {
        let mut stats = SnapshotStats::default();
        let Some(db) = self.db.get() else {
            return Ok(stats);
        };
        let parts: Vec<Arc<Part>> = self
            .parts
            .read()
            .expect("parts lock")
            .values()
            .cloned()
            .collect();
        for part in parts {
            let id = part.id.load(Ordering::Relaxed);
            let mut st = part.state.lock().expect("partition lock");
            // Under its lock: an emission sets it under the same lock.
            let emitted = part.emitted.load(Ordering::Acquire);
            st.snapshot(db, emitted, id, &mut stats)?;
        }
        Ok(stats)
    }
}

/// How a partition's end reaches the state: for good, or continued in partitions read next.
impl AggregateState {
    /// Marks the partition ended: its watermark no longer holds the stage back.
    pub fn end(&self, partition: &PartitionInfo) {
        let part = self.part(partition);
        part.watermark.store(i64::MAX, Ordering::Release);
    }

    /// Marks the partition ended with its records going on in partitions read next here:
    /// its windows are not closed by its end. Its watermark holds the stage back until a
    /// partition that follows it is assigned (which holds it back itself); then its open
    /// windows close, merged with theirs, when the stage watermark passes them.
    pub fn continues(&self, partition: &PartitionInfo) {
        let part = self.part(partition);
        // A successor assigned first (a restart resumes children with their parents).
        let followed = self
            .followed
            .lock()
            .expect("followed lock")
            .contains(&partition.name);
        let state = if followed {
            SUCCEEDED
        } else {
            AWAITING_SUCCESSORS
        };
        part.continued.store(state, Ordering::Release);
    }

    /// `partition` continues `parents`: they stop holding the watermark, and a partition
    /// new here starts where they were (its rows behind their watermark are late, as they
    /// would have been in them; what they emitted it does not emit again).
    pub fn follow(&self, partition: &PartitionInfo, parents: &[Arc<str>]) {
        self.followed
            .lock()
            .expect("followed lock")
            .extend(parents.iter().cloned());
        let (mut watermark, mut emitted) = (i64::MIN, i64::MIN);
        {
            let parts = self.parts.read().expect("parts lock");
            for parent in parents.iter().filter_map(|name| parts.get(name)) {
                if parent.continued.load(Ordering::Acquire) != NOT_CONTINUED {
                    parent.continued.store(SUCCEEDED, Ordering::Release);
                }
                watermark = watermark.max(parent.watermark.load(Ordering::Acquire));
                emitted = emitted.max(parent.emitted.load(Ordering::Acquire));
            }
        }
        let part = self.part(partition);
        let st = part.state.lock().expect("partition lock");
        // Only a partition with nothing of its own yet (not one resumed from a checkpoint).
        if part.watermark.load(Ordering::Acquire) == i64::MIN
            && part.emitted.load(Ordering::Acquire) == i64::MIN
            && watermark != i64::MAX
        {
            part.watermark.store(watermark, Ordering::Release);
            part.emitted.store(emitted, Ordering::Release);
        }
        drop(st);
    }
}
