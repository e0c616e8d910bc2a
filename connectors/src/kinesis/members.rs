//! The Kinesis source as one of several worker processes: which shards it reads comes from
//! the lease table (`lease.rs`), passed over every third of `lease_duration` in a blocking
//! task the source owns (the engine drops `next_assignment` whenever something else happens;
//! a pass must not be lost half way).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::source::{CommitHook, Handoff, TakenOver};
use sluice_engine::{Error, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lease::{Decisions, LeaseCheckpoint, LeaseTable, Observed, Pass, Taken, pass};
use super::shards::ShardDesc;

/// This member's side of the lease table.
pub struct Membership {
    /// `stream/`: a shard's partition name is the shard's id after it.
    prefix: Arc<str>,
    table: Arc<LeaseTable>,
    me: Arc<str>,
    duration: Duration,
    handoff: Option<Arc<dyn Handoff>>,
    /// Lent to the pass under way.
    observed: Option<Observed>,
    /// Shards it reads, also those it is handing over.
    pub held: BTreeSet<String>,
    /// Shards being drained to be handed over.
    releasing: BTreeSet<String>,
    hand_over: Vec<String>,
    ended: Vec<String>,
    listing: Option<Vec<(ShardDesc, bool)>>,
    skip_closed_when_new: bool,
    next_pass: Instant,
    under_way: Option<JoinHandle<Result<Passed>>>,
    /// Hand-overs draining: each yields its shard, and whether it was drained and
    /// checkpointed (not when the pipeline stopped first).
    handing: FuturesUnordered<BoxFuture<'static, (String, bool)>>,
}

/// A pass done: what to do, and where the taken shards' state was taken over.
pub struct Passed {
    observed: Observed,
    pub decisions: Decisions,
    pub taken_over: BTreeMap<String, TakenOver>,
    finished: Vec<String>,
}

/// What the member waits for.
pub enum Wait {
    Passed(Box<Passed>),
    /// A hand-over drained (or the pipeline stopped first).
    Handed(String, bool),
}

impl Membership {
    pub fn new(
        stream: &str,
        table: LeaseTable,
        me: &str,
        duration: Duration,
        skip_closed_when_new: bool,
    ) -> Membership {
        Membership {
            prefix: format!("{stream}/").into(),
            table: Arc::new(table),
            me: me.into(),
            duration,
            handoff: None,
            observed: Some(Observed::new()),
            held: BTreeSet::new(),
            releasing: BTreeSet::new(),
            hand_over: Vec::new(),
            ended: Vec::new(),
            listing: None,
            skip_closed_when_new,
            next_pass: Instant::now(),
            under_way: None,
            handing: FuturesUnordered::new(),
        }
    }

    pub fn set_handoff(&mut self, handoff: Arc<dyn Handoff>) {
        self.handoff = Some(handoff);
    }

    /// Commits each checkpoint's offsets and positions of the shards this member owns into
    /// their leases, for the next owner.
    pub fn commit_hook(&self) -> Arc<dyn CommitHook> {
        Arc::new(LeaseCommits {
            table: self.table.clone(),
            me: self.me.clone(),
            prefix: self.prefix.clone(),
        })
    }

    /// The shards as listed now: leases are made for new ones at the next pass, at once.
    pub fn listed(&mut self, listing: Vec<(ShardDesc, bool)>) {
        self.listing = Some(listing);
        self.next_pass = Instant::now();
    }

    /// The shard was read to its end and checkpointed: its lease ends at the next pass.
    pub fn shard_ended(&mut self, shard: &str) {
        self.ended.push(shard.to_string());
        self.next_pass = Instant::now();
    }

    /// A revoked shard to drain before it is handed over; `drained` fires once it is.
    pub fn handing_over(&mut self, shard: String, drained: oneshot::Receiver<()>) {
        self.releasing.insert(shard.clone());
        self.handing
            .push(Box::pin(async move { (shard, drained.await.is_ok()) }));
    }

    /// Whether the shard is already being handed over (a pass reports an ask until then).
    pub fn is_releasing(&self, shard: &str) -> bool {
        self.releasing.contains(shard)
    }

    /// Starts a pass when one is due and none is under way.
    fn start_pass(&mut self) {
        if self.under_way.is_some() || Instant::now() < self.next_pass {
            return;
        }
        let Some(mut observed) = self.observed.take() else {
            return;
        };
        let table = self.table.clone();
        let me = self.me.clone();
        let held = self.held.clone();
        let hand_over = std::mem::take(&mut self.hand_over);
        let ended = std::mem::take(&mut self.ended);
        let listing = self.listing.take();
        let (skip, duration) = (self.skip_closed_when_new, self.duration);
        let handoff = self.handoff.clone();
        let prefix = self.prefix.clone();
        self.under_way = Some(tokio::task::spawn_blocking(move || {
            let now = Instant::now().into_std();
            let decisions = table
                .locked(|t| {
                    pass(
                        t,
                        &mut observed,
                        &Pass {
                            me: &me,
                            held: &held,
                            hand_over: &hand_over,
                            ended: &ended,
                            listing: listing.as_deref(),
                            skip_closed_when_new: skip,
                            duration,
                            now,
                        },
                    )
                })
                .map_err(|e| Error::io(table.dir(), e))?;
            // The previous owner's last checkpoint holds the taken shards' stage state.
            let taken_over = match (&handoff, decisions.taken.is_empty()) {
                (Some(handoff), false) => {
                    let names: Vec<String> = decisions
                        .taken
                        .iter()
                        .map(|t| format!("{prefix}{}", t.shard))
                        .collect();
                    handoff.take_over(&names)?
                }
                _ => BTreeMap::new(),
            };
            let mut finished = hand_over;
            finished.extend(ended);
            Ok(Passed {
                observed,
                decisions,
                taken_over,
                finished,
            })
        }));
    }

    /// The next pass done or hand-over drained.
    ///
    /// # Cancel safety
    /// Cancel safe: the pass runs in a task kept across calls.
    pub async fn next(&mut self) -> Result<Wait> {
        loop {
            self.start_pass();
            let under_way = self.under_way.is_some();
            let task = &mut self.under_way;
            let passed = std::future::poll_fn(|cx| match task {
                Some(t) => std::pin::Pin::new(t).poll(cx),
                None => std::task::Poll::Pending,
            });
            tokio::select! {
                Some((shard, drained)) = self.handing.next(), if !self.handing.is_empty() => {
                    if drained {
                        self.hand_over.push(shard.clone());
                        self.next_pass = Instant::now();
                    }
                    return Ok(Wait::Handed(shard, drained));
                }
                done = passed, if under_way => {
                    self.under_way = None;
                    self.next_pass = Instant::now() + self.duration / 3;
                    let passed = done.map_err(|e| Error::task("Kinesis lease pass", e))??;
                    return Ok(Wait::Passed(Box::new(self.took(passed))));
                }
                _ = tokio::time::sleep_until(self.next_pass), if !under_way => {}
            }
        }
    }

    /// Books what a pass decided: shards handed over, ended or lost leave `held`, taken
    /// ones join it.
    fn took(&mut self, passed: Passed) -> Passed {
        for shard in passed.finished.iter().chain(&passed.decisions.lost) {
            self.held.remove(shard);
            self.releasing.remove(shard);
        }
        self.held
            .extend(passed.decisions.taken.iter().map(|t| t.shard.clone()));
        self.observed = Some(passed.observed.clone());
        Passed {
            observed: Observed::new(),
            ..passed
        }
    }
}

impl Drop for Membership {
    /// Lets the leases go at a clean stop (after the engine's last checkpoint: the source
    /// is dropped last), so other members take them at once instead of after they expire.
    fn drop(&mut self) {
        let me = self.me.clone();
        let released = self.table.locked(|t| {
            for lease in t.values_mut() {
                if lease.owner.as_deref() == Some(&me) {
                    lease.owner = None;
                    lease.counter += 1;
                }
            }
        });
        if let Err(e) = released {
            tracing::warn!(error = %e, "kinesis: releasing the leases failed; they expire instead");
        }
    }
}

/// Where a taken shard resumes: the newest of its lease's checkpoint, the state taken over
/// from its last owner and this member's own checkpoint (offsets only grow from owner to
/// owner, so the highest is the newest).
pub fn resume_of(
    taken: &Taken,
    taken_over: Option<&TakenOver>,
    own: &Checkpoint,
    partition: &str,
) -> (Option<i64>, Option<String>) {
    let own = own.offsets.get(partition).map(|o| TakenOver {
        offset: *o,
        position: own.positions.get(partition).cloned(),
    });
    let lease = taken.checkpoint.as_ref().map(|c| TakenOver {
        offset: c.offset,
        position: c.position.clone(),
    });
    [own, lease, taken_over.cloned()]
        .into_iter()
        .flatten()
        .max_by_key(|t| t.offset)
        .map_or((None, None), |t| (Some(t.offset), t.position))
}

struct LeaseCommits {
    table: Arc<LeaseTable>,
    me: Arc<str>,
    prefix: Arc<str>,
}

impl CommitHook for LeaseCommits {
    fn committed(&self, checkpoint: &Checkpoint) {
        let updates: Vec<(&str, LeaseCheckpoint)> = checkpoint
            .offsets
            .iter()
            .filter_map(|(name, offset)| {
                let shard = name.strip_prefix(self.prefix.as_ref())?;
                Some((
                    shard,
                    LeaseCheckpoint {
                        offset: *offset,
                        position: checkpoint.positions.get(name).cloned(),
                    },
                ))
            })
            .collect();
        if updates.is_empty() {
            return;
        }
        let written = self.table.locked(|t| {
            for (shard, at) in updates {
                if let Some(lease) = t.get_mut(shard)
                    && lease.owner.as_deref() == Some(&self.me)
                {
                    // A checkpoint without a position keeps the last one (it says which
                    // offset it stands for; the records up to the new offset are skipped).
                    let kept = lease.checkpoint.take().and_then(|c| c.position);
                    lease.checkpoint = Some(LeaseCheckpoint {
                        offset: at.offset,
                        position: at.position.or(kept),
                    });
                }
            }
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "kinesis: writing checkpoints into the leases failed");
        }
    }
}
