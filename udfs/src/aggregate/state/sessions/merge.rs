//! Closed sessions out of the partitions: a key's sessions of every partition grouped
//! where they overlap or touch, and, at the end of the input, every session, from memory
//! or (when some left it) from the database in key order, a chunk at a time.

use super::*;

/// A group of sessions that closed: start, end, and its merged accumulators.
type Group = (i64, i64, Option<Box<[Acc]>>);

/// Sessions of `keys` (each named by every partition that has one of it closed) from
/// every partition (read from the database where memory does not have them), grouped
/// where they overlap or touch; groups closed by `through` become rows, sorted, and leave
/// the partitions.
pub(in super::super) fn merge_sessions(
    states: &mut [std::sync::MutexGuard<'_, PartState>],
    through: i64,
    (keys, aggs): (Vec<Key>, &[AggDef]),
    db: Option<&DB>,
) -> Result<Vec<SessionRow>> {
    // Each once, in any order (the rows are sorted last).
    let keys: hashbrown::HashSet<Key> = keys.into_iter().collect();
    let mut rows = Vec::new();
    let mut batch = WriteBatch::default();
    // Per key, made again for each (kept here: allocated once for all the keys).
    // (start, end, partition index, session index)
    let mut all: Vec<(i64, i64, usize, usize)> = Vec::new();
    // Groups of sessions that overlap or touch; the closed ones become rows, their
    // sessions taken out of the partitions: (partition, session index, group).
    let mut closed: Vec<Group> = Vec::new();
    let mut taken: Vec<(usize, usize, usize)> = Vec::new();
    // (partition, group end) of sessions closed on their own whose group stays open
    // (another partition's session of the key reaches past `through`).
    let mut held: Vec<(usize, i64)> = Vec::new();
    // Each partition's slot of the key: what it took before, and what it takes after
    // (`None` when it is left without sessions).
    let mut sizes: Vec<Option<(usize, Option<usize>)>> = Vec::with_capacity(states.len());
    let Some(shape) = states.first().map(|st| st.sessions.shape) else {
        return Ok(rows);
    };
    for key in keys {
        for st in states.iter_mut() {
            let st = &mut **st;
            st.sessions.fetch(db, &key, &mut st.mem)?;
        }
        // Each partition's slot of the key, looked up once.
        let mut slots: Vec<Option<&mut Slot>> = states
            .iter_mut()
            .map(|st| st.sessions.slots.get_mut(&*key))
            .collect();
        sizes.clear();
        sizes.extend(
            slots
                .iter()
                .map(|s| s.as_ref().map(|s| (slot_size(&key, s, shape), None))),
        );
        all.clear();
        for (p, slot) in slots.iter().enumerate() {
            if let Some(slot) = slot {
                all.extend(
                    slot.sessions
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (s.start, s.end, p, i)),
                );
            }
        }
        all.sort_unstable();
        closed.clear();
        taken.clear();
        held.clear();
        let mut i = 0;
        while i < all.len() {
            let (start, mut end) = (all[i].0, all[i].1);
            let mut j = i + 1;
            while j < all.len() && all[j].0 <= end {
                end = end.max(all[j].1);
                j += 1;
            }
            if session_closed(end, through) {
                let group = closed.len();
                closed.push((start, end, None));
                taken.extend(all[i..j].iter().map(|&(_, _, p, s)| (p, s, group)));
            } else {
                held.extend(
                    all[i..j]
                        .iter()
                        .filter(|x| session_closed(x.1, through))
                        .map(|&(_, _, p, _)| (p, end)),
                );
            }
            i = j;
        }
        // Highest index first, so the others keep theirs.
        taken.sort_unstable_by(|a, b| b.cmp(a));
        for &(p, s, group) in &taken {
            let slot = slots[p].as_mut().expect("slot of a taken session");
            let session = slot.sessions.remove(s);
            slot.dirty = true;
            match &mut closed[group].2 {
                Some(accs) => {
                    for (a, b) in accs.iter_mut().zip(session.accs.into_vec()) {
                        a.merge(b);
                    }
                }
                none => *none = Some(session.accs),
            }
        }
        // A held session comes out with its group: marked at the group's end, in memory and
        // at its next write, so that it is looked at again then, also if the partition
        // holding the group open has left meanwhile (its part is then a row of its own).
        for &(p, end) in &held {
            let slot = slots[p].as_mut().expect("slot of a held session");
            if slot.held.is_none_or(|h| h < end) {
                slot.held = Some(end);
                slot.dirty = true;
            }
        }
        for (slot, size) in slots.iter().zip(sizes.iter_mut()) {
            if let (Some(slot), Some((_, now))) = (slot, size) {
                *now = (!slot.sessions.is_empty()).then(|| slot_size(&key, slot, shape));
            }
        }
        drop(slots);
        // A key left without sessions leaves memory, and the database.
        for (st, size) in states.iter_mut().zip(&sizes) {
            let st = &mut **st;
            let Some((before, now)) = *size else {
                continue;
            };
            st.mem = st.mem.saturating_sub(before) + now.unwrap_or(0);
            let s = &mut st.sessions;
            if now.is_none() && s.slots.remove(&*key).is_some_and(|slot| slot.stored) {
                batch.delete(s.keys.session(&key));
                s.stored.keys = s.stored.keys.saturating_sub(1);
            }
        }
        for &(p, end) in &held {
            // The partition's own copy of the key (the set's may be another's).
            let s = &mut states[p].sessions;
            let own = s
                .slots
                .get_key_value(&*key)
                .map_or(&key, |(k, _)| k)
                .clone();
            s.ends.push(end, own);
        }
        for (start, end, accs) in closed.drain(..) {
            let accs = accs.unwrap_or_else(|| aggs.iter().map(AggDef::new_acc).collect());
            rows.push(SessionRow {
                key: key[..].into(),
                start,
                end,
                accs,
            });
        }
    }
    if let Some(db) = db {
        db.write_opt(batch, &unlogged()).map_err(db_error)?;
    }
    rows.sort_unstable_by(|a, b| (a.end, a.start, &a.key).cmp(&(b.end, b.start, &b.key)));
    Ok(rows)
}

/// Every session of `states` closes (the end of the input), all in memory (none in the
/// database but those memory holds too, deleted here): each partition's sessions are taken
/// out whole (rather than looked up key by key in every partition), and those of one key
/// grouped where they overlap or touch and merged into rows.
pub(in super::super) fn merge_all_sessions(
    states: &mut [std::sync::MutexGuard<'_, PartState>],
    db: Option<&DB>,
) -> Result<Vec<SessionRow>> {
    let mut by_key: HashMap<Key, Vec<Session>> = HashMap::new();
    let mut batch = WriteBatch::default();
    for st in states.iter_mut() {
        let st = &mut **st;
        let s = &mut st.sessions;
        for (key, slot) in s.slots.drain() {
            st.mem = st.mem.saturating_sub(slot_size(&key, &slot, s.shape));
            if slot.stored {
                batch.delete(s.keys.session(&key));
            }
            if !slot.sessions.is_empty() {
                by_key.entry(key).or_default().extend(slot.sessions);
            }
        }
        if s.stored.first.is_some() {
            batch.delete_range(&s.keys.ends, &prefix_end(&s.keys.ends));
        }
        st.sessions.emptied(&mut st.mem);
    }
    if let Some(db) = db {
        db.write_opt(batch, &unlogged()).map_err(db_error)?;
    }
    let mut rows = Vec::with_capacity(by_key.len());
    for (key, sessions) in by_key {
        group(&key, sessions, &mut rows);
    }
    rows.sort_unstable_by(|a, b| (a.end, a.start, &a.key).cmp(&(b.end, b.start, &b.key)));
    Ok(rows)
}

/// A key's sessions from every partition, grouped where they overlap or touch, as rows.
fn group(key: &[u8], mut sessions: Vec<Session>, rows: &mut Vec<SessionRow>) {
    sessions.sort_unstable_by_key(|s| (s.start, s.end));
    let mut group: Option<Session> = None;
    for s in sessions {
        match &mut group {
            Some(g) if s.start <= g.end => {
                g.end = g.end.max(s.end);
                for (a, b) in g.accs.iter_mut().zip(s.accs.into_vec()) {
                    a.merge(b);
                }
            }
            _ => {
                if let Some(g) = group.replace(s) {
                    rows.push(SessionRow {
                        key: key.into(),
                        start: g.start,
                        end: g.end,
                        accs: g.accs,
                    });
                }
            }
        }
    }
    if let Some(g) = group {
        rows.push(SessionRow {
            key: key.into(),
            start: g.start,
            end: g.end,
            accs: g.accs,
        });
    }
}

/// Every session of `states` closes (the end of the input) while some are in the
/// database: memory's are written there too and leave memory, and the returned reader
/// emits them all in key order, a chunk at a time, so that the end of the input needs no
/// more memory than a chunk however many sessions are open.
pub(in super::super) fn write_all_sessions(
    states: &mut [std::sync::MutexGuard<'_, PartState>],
    db: &DB,
) -> Result<StoredSessions> {
    let mut sources = Vec::with_capacity(states.len());
    let mut value = Vec::new();
    for st in states.iter_mut() {
        let st = &mut **st;
        let s = &mut st.sessions;
        let mut batch = WriteBatch::default();
        for (key, mut slot) in s.slots.drain() {
            st.mem = st.mem.saturating_sub(slot_size(&key, &slot, s.shape));
            if slot.dirty {
                // No markers: every session closes now.
                s.keys.write(
                    &mut s.stored,
                    &key,
                    &mut slot,
                    i64::MAX,
                    &mut batch,
                    &mut value,
                );
            }
            if batch.size_in_bytes() > WRITE_BATCH_BYTES {
                db.write_opt(std::mem::take(&mut batch), &unlogged())
                    .map_err(db_error)?;
            }
        }
        db.write_opt(batch, &unlogged()).map_err(db_error)?;
        let keys = s.keys.clone();
        st.sessions.emptied(&mut st.mem);
        sources.push(SessionSource {
            keys,
            next: None,
            buffer: VecDeque::new(),
            done: false,
        });
    }
    Ok(StoredSessions { sources })
}

/// The sessions of partitions in the database, read back in key order (see
/// [`write_all_sessions`]).
pub(in super::super) struct StoredSessions {
    sources: Vec<SessionSource>,
}

struct SessionSource {
    keys: DbKeys,
    /// The next key to read (after the prefix); from the start when `None`.
    next: Option<Vec<u8>>,
    buffer: VecDeque<(Box<[u8]>, Vec<Session>)>,
    done: bool,
}

impl StoredSessions {
    /// Rows of the next keys, until `rows` holds [`CHUNK`] or every key was read; after the
    /// last, the partitions' sessions and end markers leave the database.
    pub(in super::super) fn next_rows(
        &mut self,
        db: &DB,
        aggs: usize,
        rows: &mut Vec<SessionRow>,
    ) -> Result<()> {
        while rows.len() < CHUNK && !self.sources.is_empty() {
            for s in self.sources.iter_mut() {
                if s.buffer.is_empty() && !s.done {
                    let buffer = &mut s.buffer;
                    read_range(
                        db.raw_iterator(),
                        &s.keys.sessions,
                        (&mut s.next, &mut s.done),
                        |key, value| {
                            buffer.push_back((key.into(), decode_sessions(value, aggs)?.0));
                            Ok(())
                        },
                    )?;
                }
            }
            let Some(key) = self
                .sources
                .iter()
                .filter_map(|s| s.buffer.front().map(|(k, _)| k))
                .min()
                .cloned()
            else {
                let mut batch = WriteBatch::default();
                for s in self.sources.drain(..) {
                    for prefix in [&s.keys.sessions, &s.keys.ends] {
                        batch.delete_range(prefix, &prefix_end(prefix));
                    }
                }
                db.write_opt(batch, &unlogged()).map_err(db_error)?;
                break;
            };
            let mut sessions = Vec::new();
            for s in self.sources.iter_mut() {
                if s.buffer.front().is_some_and(|(k, _)| *k == key) {
                    sessions.extend(s.buffer.pop_front().expect("a front entry").1);
                }
            }
            group(&key, sessions, rows);
        }
        Ok(())
    }
}
