//! What is due: which windows the stage watermark has passed, and taking them out of the
//! partitions (under their locks) into a [`Closing`] that emits them.

use super::*;

impl AggregateState {
    /// What an emission now would take, seen in one pass: the point to close through and
    /// the partitions due to emit up to it, with the restored partitions that went idle
    /// without being assigned (their state is not this process's to keep in memory).
    ///
    /// The point is the stage watermark: the minimum over the partitions read here (and
    /// those restored and not assigned yet), idle ones left out; while every one is idle,
    /// the largest of the assigned ones' watermarks. When every counted partition has
    /// ended (the end of a bounded input), a
    /// partition that has not (idle, or held up behind a retry) is closed only through the
    /// largest finite watermark: the end of the input closes only what has ended. Due: the
    /// assigned partitions, not revoked (their windows are the next owner's to emit), that
    /// have not emitted through the point.
    fn due(&self) -> Option<Due> {
        let now = self.now();
        let parts = self.parts.read().expect("parts lock");
        let mut through: Option<i64> = None;
        let mut open = None::<i64>;
        // The largest watermark of the assigned partitions that are idle.
        let mut idle_max = None::<i64>;
        let mut stale = Vec::new();
        for (name, p) in parts.iter() {
            let active = p.active.load(Ordering::Acquire);
            let restored = p.restored.load(Ordering::Acquire);
            if !active && !restored {
                continue;
            }
            let wm = p.watermark.load(Ordering::Acquire);
            let continued = p.continued.load(Ordering::Acquire);
            if continued == SUCCEEDED {
                // Its successors hold the watermark; it only takes part in emissions.
                continue;
            }
            let caught_up = p.caught_up();
            let idle = now - p.last_data.load(Ordering::Relaxed) > self.plan.idle_timeout
                && caught_up != CaughtUp::No
                && continued == NOT_CONTINUED;
            if wm == i64::MAX || !idle {
                through = Some(through.map_or(wm, |t| t.min(wm)));
            } else if active && !p.revoked.load(Ordering::Acquire) && caught_up == CaughtUp::Yes {
                idle_max = Some(idle_max.map_or(wm, |m| m.max(wm)));
            }
            if active && wm != i64::MAX {
                open = Some(open.map_or(wm, |o| o.max(wm)));
            }
            if restored && !active && idle {
                stale.push(name.clone());
            }
        }
        // Every partition idle: nothing will move the watermark, so it goes to the largest
        // of theirs (as Flink's valve flushes when its last active input goes idle): the
        // partitions that went silent after the others do not keep their windows for ever.
        // Only those known to be caught up count (not revoked ones, nor ones not read yet).
        let mut at = through.or(idle_max)?;
        if at == i64::MAX
            && let Some(open) = open
        {
            at = open;
        }
        let mut parts: Vec<Arc<Part>> = parts
            .values()
            .filter(|p| {
                p.active.load(Ordering::Acquire)
                    && !p.revoked.load(Ordering::Acquire)
                    && p.emitted.load(Ordering::Acquire) < at
            })
            .cloned()
            .collect();
        // Nothing of any of them closes: no emission, no locks (this runs after every
        // batch). When something does, every partition behind `at` takes part: sessions of
        // one key merge across partitions, also those whose own marker is not due.
        if !parts.iter().any(|p| p.due_at.load(Ordering::Acquire) <= at) {
            parts.clear();
        }
        Some(Due {
            through: at,
            parts,
            stale,
        })
    }

    /// Takes every window the stage watermark has passed out of the partitions that have
    /// not emitted it yet: the returned cursor yields their rows, merged across partitions.
    pub fn close_windows(&self) -> Result<Option<Closing>> {
        if self
            .due()
            .is_none_or(|d| d.parts.is_empty() && d.stale.is_empty())
        {
            return Ok(None);
        }
        let _emitting = self.emission.lock().expect("emission lock");
        // Again under the lock, in one pass: what another emission did meanwhile counts.
        let Some(Due {
            through,
            parts,
            stale,
        }) = self.due()
        else {
            return Ok(None);
        };
        self.drop_stale(&stale);
        if parts.is_empty() {
            return Ok(None);
        }
        // Every partition at once, in name order (the only place more than one is held).
        let mut states: Vec<_> = parts
            .iter()
            .map(|p| p.state.lock().expect("partition lock"))
            .collect();
        let mut closing = Closing::default();
        // What the partitions hold before: closing frees memory, and reads sessions that
        // are due back from the database.
        let before: usize = states.iter().map(|st| st.mem).sum();
        let db = self.db.get().cloned();
        let store = db.as_deref().map(|d| &**d);
        // Taken (once) if a pane that spilled is emitted while it still changes.
        let mut frozen = None;
        let mut panes = Vec::new();
        // Keys with a session closed, of any partition.
        let mut session_keys = Vec::new();
        for (part, st) in parts.iter().zip(states.iter_mut()) {
            // Its windows ending after this were not emitted yet. Set under its lock: its
            // rows added from now on see it.
            let before = part.emitted.swap(through, Ordering::AcqRel);
            let st = &mut **st;
            st.meta_dirty = true;
            if let Some(slide) = self.slide() {
                let span = (before, through, slide);
                self.close_panes(st, span, db.as_ref(), &mut frozen, &mut panes)?;
            }
            if through != i64::MAX {
                st.sessions
                    .close(store, through, &mut session_keys, &mut st.mem)?;
            }
        }
        if through == i64::MAX {
            if matches!(self.plan.window, WindowKind::Session { .. }) {
                match store {
                    Some(store) if states.iter().any(|st| st.sessions.spilled()) => {
                        closing.stored_sessions = Some(write_all_sessions(&mut states, store)?);
                    }
                    _ => closing.ready = merge_all_sessions(&mut states, store)?,
                }
            }
        } else if !session_keys.is_empty() {
            let keys = (session_keys, &self.plan.aggs[..]);
            closing.ready = merge_sessions(&mut states, through, keys, store)?;
        }
        for (part, st) in parts.iter().zip(states.iter()) {
            self.set_due(part, st, through);
        }
        let after: usize = states.iter().map(|st| st.mem).sum();
        self.account(before, after);
        // Sessions read back for this emission that stay open count like any state (also
        // where the emission freed as much elsewhere: the stage may be over its budget
        // already, and an emission by time has no batch after it to make room).
        if let Some(store) = store
            && self.memory.load(Ordering::Relaxed) > self.plan.budget as i64
        {
            let mut states: Vec<&mut PartState> = states.iter_mut().map(|st| &mut **st).collect();
            self.make_room(store, &mut states, &vec![through; parts.len()])?;
        }
        drop(states);
        self.add_panes(&mut closing, panes, through);
        closing.db = db;
        closing.aggs = self.plan.aggs.len();
        Ok(Some(closing))
    }

    /// Sets [`Part::due_at`] from its state (held locked) and what it has emitted.
    pub(super) fn set_due(&self, part: &Part, st: &PartState, emitted: i64) {
        part.due_at
            .store(st.due_at(emitted, self.slide()), Ordering::Release);
    }

    /// Takes this partition's part of the windows ending in `(before, through]` into
    /// `closing`: from each of its panes, a source per window holding the pane. A pane no
    /// later window needs leaves the partition (its entries moved; its stored ones read as
    /// the windows are emitted and deleted after the last). A pane still needed stays: its
    /// entries in memory are copied, its stored ones read from a snapshot of the database
    /// taken now, since it goes on changing while these windows are emitted.
    fn close_panes(
        &self,
        st: &mut PartState,
        (before, through, slide): (i64, i64, i64),
        db: Option<&Arc<StateDb>>,
        frozen: &mut Option<Arc<Frozen>>,
        out: &mut Vec<PaneOut>,
    ) -> Result<()> {
        let span = self.last_window_of(0);
        // Panes with a window in (before, through]: pane <= through and pane + span > before.
        let lo = before.saturating_sub(span).saturating_add(1);
        if lo > through {
            return Ok(());
        }
        let panes: Vec<i64> = st.windows.range(lo..=through).map(|(p, _)| *p).collect();
        for pane in panes {
            let last = self.last_window_of(pane);
            let first_end = if before < pane {
                pane
            } else {
                pane + ((before - pane) / slide + 1) * slide
            };
            let last_end = pane + (last.min(through) - pane).div_euclid(slide) * slide;
            if first_end > last_end {
                continue;
            }
            let done = last <= through;
            let prefix = [st.prefix.as_slice(), &ordered(pane)].concat();
            let upto = [st.prefix.as_slice(), &ordered(pane.saturating_add(1))].concat();
            let mut delete = None;
            let (entries, order, stored) = if done {
                let mut window = st.windows.remove(&pane).expect("a listed pane");
                st.pane_hint = window.entries.len();
                let order = window.take_order(&mut st.mem);
                let bytes = window.filter.size() + window.entries.bytes();
                st.mem = st.mem.saturating_sub(bytes);
                let mem = window.entries.into_shared();
                // Evicted: its windows read the database too, the last one deletes it.
                // Else what a checkpoint wrote is in memory as well (newer or equal): it
                // is only deleted, after the last window.
                let evicted = window.evicted && db.is_some();
                if window.stored && !evicted && db.is_some() {
                    delete = Some((prefix.clone(), upto.clone()));
                }
                (mem, order, evicted.then_some(None))
            } else {
                let window = st.windows.get_mut(&pane).expect("a listed pane");
                let order = window.key_order(&mut st.mem);
                let mem = window.entries.share();
                // Not evicted: every key in the database is in memory too, newer or equal.
                let stored = match db {
                    Some(db) if window.evicted => {
                        Some(Some(frozen.get_or_insert_with(|| Frozen::new(db)).clone()))
                    }
                    _ => None,
                };
                (mem, order, stored)
            };
            let mut windows = Vec::new();
            let mut end = first_end;
            while end <= last_end {
                let stored = stored.as_ref().map(|frozen| StoredRange {
                    prefix: prefix.clone(),
                    upto: upto.clone(),
                    delete: end == last,
                    frozen: frozen.clone(),
                });
                windows.push((end, self.window_start(end), stored));
                end += slide;
            }
            out.push(PaneOut {
                pane,
                table: entries,
                order: order.cell,
                windows,
                done,
                delete,
            });
        }
        Ok(())
    }
}

impl PartState {
    /// See [`Part::due_at`]: for panes, the first window after `emitted` that holds the
    /// first pane (window ends are multiples of the slide, as pane ends are).
    fn due_at(&self, emitted: i64, slide: Option<i64>) -> i64 {
        let panes = match (self.windows.keys().next(), slide) {
            (Some(&first), Some(slide)) => {
                let next = emitted
                    .div_euclid(slide)
                    .saturating_mul(slide)
                    .saturating_add(slide);
                first.max(next)
            }
            _ => i64::MAX,
        };
        let sessions = self
            .sessions
            .first_end()
            .map_or(i64::MAX, |e| e.saturating_add(1));
        panes.min(sessions)
    }
}

/// What [`AggregateState::due`] found.
struct Due {
    through: i64,
    parts: Vec<Arc<Part>>,
    stale: Vec<Arc<str>>,
}

impl Part {
    /// Whether every record of the partition known to exist is done (its lag is 0), or
    /// nothing tells (a source that cannot say where a partition ends): only then may
    /// silence count as idleness. Batches read and not done (in retries, behind a slow
    /// stage, before the checkpoint that takes them), pages fetched and not read, records
    /// not fetched yet keep the partition's windows open, and so does a log end not read
    /// yet. Where the source can tell, has read the end, but the position is not known yet
    /// (a partition whose start could not be looked up, before its first record), silence
    /// decides, but the partition does not count as caught up when every partition is idle
    /// (see `AggregateState::due`).
    fn caught_up(&self) -> CaughtUp {
        if self.continued.load(Ordering::Acquire) != NOT_CONTINUED {
            return CaughtUp::Yes;
        }
        let lag = self.lag.lock().expect("lag lock");
        let Some(p) = lag.as_ref() else {
            return CaughtUp::Yes;
        };
        // Read before what is in flight: a source says "at the tip" only after counting the
        // records that answer brought (`LogEnd::fetched_end`), so a fresh answer read
        // first is never paired with a count from before it.
        let lag_ms = p.lag_ms();
        if p.in_flight() {
            return CaughtUp::No;
        }
        let Some(end) = p.end.as_ref() else {
            return CaughtUp::Yes;
        };
        if p.position.load(Ordering::Relaxed) == i64::MIN {
            // Where it ends not read yet either (the broker has not answered since the
            // assignment): nothing says it is caught up.
            let end_read = lag_ms.is_some() || end.log_end().is_some();
            return if end_read {
                CaughtUp::Unknown
            } else {
                CaughtUp::No
            };
        }
        // In records where the source counts them (Kafka), else in time (Kinesis's
        // MillisBehindLatest: 0 when the reader is at the tip).
        match (p.lag(), lag_ms) {
            (Some(0), _) | (None, Some(0)) => CaughtUp::Yes,
            _ => CaughtUp::No,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CaughtUp {
    Yes,
    No,
    /// The source can say where the partition ends, but where it reads is not known yet.
    Unknown,
}
