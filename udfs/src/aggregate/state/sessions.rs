//! Session windows: per key, disjoint sessions; in memory, written at checkpoints.

use super::*;

#[derive(Default)]
pub(super) struct Sessions {
    slots: HashMap<Box<[u8]>, Slot>,
    /// (end, key) of every session end ever set; stale ones are skipped when popped.
    ends: BinaryHeap<std::cmp::Reverse<(i64, Box<[u8]>)>>,
}

#[derive(Default)]
struct Slot {
    sessions: Vec<Session>,
    dirty: bool,
    stored: bool,
}

#[derive(Clone)]
struct Session {
    start: i64,
    end: i64,
    accs: Box<[Acc]>,
}

/// A slot of the sessions' hash table: key and sessions, and the control byte.
const SLOT: usize = std::mem::size_of::<(Box<[u8]>, Slot)>() + 1;

fn session_size(key: &[u8], s: &Session) -> usize {
    entry_size(key, &s.accs) + 16 + SLOT
}

impl Sessions {
    /// Adds a row at `time` (its session would end at `end`); false when it is late.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add(
        &mut self,
        key: &[u8],
        time: i64,
        end: i64,
        closed: i64,
        aggs: &[AggDef],
        views: &[Input],
        row: usize,
        order: Order,
        mem: &mut usize,
    ) -> bool {
        // A row behind its partition's watermark is late: it could only join sessions that
        // have ended, and whether those were emitted yet depends on batch boundaries.
        if time < closed {
            return false;
        }
        let slot = match self.slots.entry_ref(key) {
            EntryRef::Occupied(o) => o.into_mut(),
            EntryRef::Vacant(v) => v.insert(Slot::default()),
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
                    *mem = mem.saturating_sub(session_size(key, &slot.sessions[i]));
                    at = Some(i);
                    i += 1;
                }
                Some(j) => {
                    // Moves the last session to `i`, which is after `j`.
                    let s = slot.sessions.swap_remove(i);
                    *mem = mem.saturating_sub(session_size(key, &s));
                    let into = &mut slot.sessions[j];
                    for (a, b) in into.accs.iter_mut().zip(s.accs.into_vec()) {
                        a.merge(b);
                    }
                    into.start = into.start.min(s.start);
                    into.end = into.end.max(s.end);
                }
            }
        }
        let session = match at {
            Some(j) => {
                let s = &mut slot.sessions[j];
                s.start = s.start.min(time);
                s.end = s.end.max(end);
                s
            }
            None => {
                // A new session needs an end marker. A session that grows keeps the
                // marker it has: an end it has passed, re-armed when popped (`close`).
                self.ends.push(std::cmp::Reverse((end, Box::from(key))));
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
        *mem += session_size(key, session);
        slot.dirty = true;
        if self.ends.len() > 4 * self.slots.len() + 1024 {
            self.compact();
        }
        true
    }

    /// The earliest end marker: at or before every session's end that has one.
    pub(super) fn first_end(&self) -> Option<i64> {
        self.ends.peek().map(|m| (m.0).0)
    }

    /// Drops stale end markers.
    pub(super) fn compact(&mut self) {
        let live: Vec<_> = self
            .slots
            .iter()
            .flat_map(|(k, s)| {
                s.sessions
                    .iter()
                    .map(move |x| std::cmp::Reverse((x.end, k.clone())))
            })
            .collect();
        self.ends = live.into();
    }

    /// Moves the keys with a session closed by `through` (see [`session_closed`]) to `out`
    /// (key only, with empty rows): the merge across partitions decides what is emitted.
    ///
    /// Every session has a marker at or before its end: set when it opened, and left
    /// behind as it grew (one heap push per session rather than per row). A marker
    /// popped for a key whose sessions are not all closed is set again at the earliest
    /// open one's end.
    pub(super) fn close(&mut self, through: i64, out: &mut Vec<SessionRow>) {
        while let Some(std::cmp::Reverse((end, _))) = self.ends.peek() {
            if !session_closed(*end, through) {
                break;
            }
            let std::cmp::Reverse((_, key)) = self.ends.pop().expect("peeked");
            let Some(slot) = self.slots.get(&key) else {
                continue;
            };
            if slot.sessions.iter().any(|x| session_closed(x.end, through)) {
                out.push(SessionRow {
                    key: key.clone(),
                    start: 0,
                    end: 0,
                    accs: Box::new([]),
                });
            }
            let open = slot
                .sessions
                .iter()
                .map(|x| x.end)
                .filter(|end| !session_closed(*end, through))
                .min();
            if let Some(open) = open {
                self.ends.push(std::cmp::Reverse((open, key)));
            }
        }
    }

    pub(super) fn snapshot(
        &mut self,
        prefix: &[u8],
        batch: &mut WriteBatch,
        stats: &mut SnapshotStats,
        flush: &mut dyn FnMut(&mut WriteBatch, &mut SnapshotStats) -> Result<()>,
    ) -> Result<()> {
        let mut value = Vec::new();
        let mut key = prefix.to_vec();
        for (k, slot) in self.slots.iter_mut().filter(|(_, s)| s.dirty) {
            key.truncate(prefix.len());
            key.extend_from_slice(k);
            if slot.sessions.is_empty() {
                if slot.stored {
                    batch.delete(&key);
                }
            } else {
                value.clear();
                value.extend_from_slice(&(slot.sessions.len() as u32).to_le_bytes());
                for s in &slot.sessions {
                    value.extend_from_slice(&s.start.to_le_bytes());
                    value.extend_from_slice(&s.end.to_le_bytes());
                    acc::encode(&s.accs, &mut value);
                }
                batch.put(&key, &value);
                slot.stored = true;
            }
            slot.dirty = false;
            stats.keys += 1;
            flush(batch, stats)?;
        }
        self.slots.retain(|_, s| !s.sessions.is_empty());
        Ok(())
    }

    pub(super) fn restore(&mut self, db: &DB, prefix: &[u8], aggs: usize) -> Result<usize> {
        let mut mem = 0;
        for item in db.iterator(IteratorMode::From(prefix, Direction::Forward)) {
            let (key, value) = item.map_err(db_error)?;
            let Some(k) = key.strip_prefix(prefix) else {
                break;
            };
            let bad = || Error::Internal("corrupt session state".into());
            let n = u32::from_le_bytes(value.get(..4).ok_or_else(bad)?.try_into().expect("4"));
            let mut rest = &value[4..];
            let mut slot = Slot {
                stored: true,
                ..Slot::default()
            };
            for _ in 0..n {
                if rest.len() < 16 {
                    return Err(bad());
                }
                let start = i64::from_le_bytes(rest[..8].try_into().expect("8"));
                let end = i64::from_le_bytes(rest[8..16].try_into().expect("8"));
                let (accs, tail) = acc::decode(&rest[16..], aggs)?;
                rest = tail;
                let s = Session {
                    start,
                    end,
                    accs: accs.into_boxed_slice(),
                };
                mem += session_size(k, &s);
                self.ends.push(std::cmp::Reverse((end, Box::from(k))));
                slot.sessions.push(s);
            }
            self.slots.insert(k.into(), slot);
        }
        Ok(mem)
    }
}

/// Whether a session ending at `end` is closed once the watermark is `through`: only when
/// the watermark is past its end, since a row at `end` itself would still join it (at the
/// end of the input, `through` is the end of time and every session closes).
fn session_closed(end: i64, through: i64) -> bool {
    end < through || through == i64::MAX
}

/// A group of sessions that closed: start, end, and its merged accumulators.
type Group = (i64, i64, Option<Box<[Acc]>>);

/// Sessions of the keys in `closing.ready` from every partition, grouped where they
/// overlap or touch; groups closed by `through` become rows and leave the partitions.
pub(super) fn merge_sessions(
    states: &mut [std::sync::MutexGuard<'_, PartState>],
    through: i64,
    closing: &mut Closing,
    aggs: &[AggDef],
    freed: &mut usize,
) {
    // Every partition names its keys: each once, in any order (the rows are sorted last).
    let keys: hashbrown::HashSet<Box<[u8]>> = closing.ready.drain(..).map(|r| r.key).collect();
    let mut rows = Vec::new();
    for key in keys {
        // (start, end, partition index, session index)
        let mut all: Vec<(i64, i64, usize, usize)> = Vec::new();
        for (p, st) in states.iter().enumerate() {
            if let Some(slot) = st.sessions.slots.get(&key) {
                all.extend(
                    slot.sessions
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (s.start, s.end, p, i)),
                );
            }
        }
        all.sort_unstable();
        // Groups of sessions that overlap or touch, as ranges of `all`; the closed ones
        // become rows, their sessions taken out of the partitions: (partition, session
        // index, group).
        let mut closed: Vec<Group> = Vec::new();
        let mut taken: Vec<(usize, usize, usize)> = Vec::new();
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
            }
            i = j;
        }
        // Highest index first, so the others keep theirs.
        taken.sort_unstable_by(|a, b| b.cmp(a));
        for (p, s, group) in taken {
            let st = &mut *states[p];
            let slot = st
                .sessions
                .slots
                .get_mut(&key)
                .expect("slot of a taken session");
            let session = slot.sessions.remove(s);
            let size = session_size(&key, &session);
            st.mem = st.mem.saturating_sub(size);
            *freed += size;
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
        for (start, end, accs) in closed {
            let accs = accs.unwrap_or_else(|| aggs.iter().map(AggDef::new_acc).collect());
            rows.push(SessionRow {
                key: key.clone(),
                start,
                end,
                accs,
            });
        }
    }
    rows.sort_unstable_by(|a, b| (a.end, a.start, &a.key).cmp(&(b.end, b.start, &b.key)));
    closing.ready = rows;
}

/// Every session of `states` closes (the end of the input): each partition's sessions are
/// taken out whole (rather than looked up key by key in every partition), and those of one
/// key grouped where they overlap or touch and merged into rows. Their slots stay, empty
/// and dirty, so that the next snapshot deletes what the database holds of them.
pub(super) fn merge_all_sessions(
    states: &mut [std::sync::MutexGuard<'_, PartState>],
    freed: &mut usize,
) -> Vec<SessionRow> {
    let mut by_key: HashMap<&[u8], Vec<Session>> = HashMap::new();
    for st in states.iter_mut() {
        let st = &mut **st;
        st.sessions.ends.clear();
        for (key, slot) in st.sessions.slots.iter_mut() {
            if slot.sessions.is_empty() {
                continue;
            }
            let sessions = std::mem::take(&mut slot.sessions);
            let size: usize = sessions.iter().map(|s| session_size(key, s)).sum();
            st.mem = st.mem.saturating_sub(size);
            *freed += size;
            slot.dirty = true;
            by_key.entry(key).or_default().extend(sessions);
        }
    }
    let mut rows = Vec::with_capacity(by_key.len());
    for (key, mut sessions) in by_key {
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
    rows.sort_unstable_by(|a, b| (a.end, a.start, &a.key).cmp(&(b.end, b.start, &b.key)));
    rows
}
