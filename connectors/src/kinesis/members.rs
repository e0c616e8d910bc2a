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
use sluice_engine::source::{CommitHook, Handoff, LogEnd, ResumeAt};
use sluice_engine::{Error, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lease::{Decisions, LeaseTable, Observed, Pass, Taken, pass};
use super::reader::MillisBehind;
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
    /// Shards it holds the lease of, also those it is handing over.
    held: BTreeSet<String>,
    /// The shards being read (their state brought here, their readers started), with
    /// their readers' lag in time, written into their leases at each renewal.
    behind: BTreeMap<String, Arc<MillisBehind>>,
    /// Shards being drained to be handed over.
    releasing: BTreeSet<String>,
    hand_over: Vec<String>,
    ended: Vec<String>,
    listing: Option<Vec<(ShardDesc, bool)>>,
    /// The pipeline starts at `latest`.
    at_latest: bool,
    fresh: bool,
    next_pass: Instant,
    under_way: Option<JoinHandle<Result<Passed>>>,
    /// Taken shards whose state is to be brought here before they are read.
    to_take: Vec<Taken>,
    taking: Option<JoinHandle<Result<TakenShards>>>,
    /// Hand-overs draining: each yields its shard, and whether it was drained and
    /// checkpointed (not when the pipeline stopped first).
    handing: FuturesUnordered<BoxFuture<'static, (String, bool)>>,
}

/// A pass done: what to do.
pub struct Passed {
    observed: Observed,
    pub decisions: Decisions,
    /// The hand-overs and ends it wrote (none when it was skipped: they wait for the next).
    written: Vec<String>,
}

/// Shards taken, with where their stage state is now.
pub struct TakenShards {
    pub taken: Vec<Taken>,
    pub at: BTreeMap<String, ResumeAt>,
    /// Whether the stages keep state: a taken shard then resumes exactly where its state
    /// is (`at`), never further on.
    pub stateful: bool,
}

/// What the member waits for.
pub enum Wait {
    /// A pass: shards lost and asked for (taken ones come as `Taken`).
    Passed(Box<Passed>),
    Taken(Box<TakenShards>),
}

impl Membership {
    pub fn new(
        stream: &str,
        table: LeaseTable,
        me: &str,
        duration: Duration,
        at_latest: bool,
    ) -> Membership {
        Membership {
            prefix: format!("{stream}/").into(),
            table: Arc::new(table),
            me: me.into(),
            duration,
            handoff: None,
            observed: Some(Observed::new()),
            held: BTreeSet::new(),
            behind: BTreeMap::new(),
            releasing: BTreeSet::new(),
            hand_over: Vec::new(),
            ended: Vec::new(),
            listing: None,
            at_latest,
            fresh: false,
            next_pass: Instant::now(),
            under_way: None,
            to_take: Vec::new(),
            taking: None,
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
    /// `fresh`: nothing of the stream is checkpointed here (see `Pass::skip_closed_when_new`).
    pub fn listed(&mut self, listing: Vec<(ShardDesc, bool)>, fresh: bool) {
        self.listing = Some(listing);
        self.fresh = fresh;
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

    /// The shard's reader started: its lag goes into its lease from now on.
    pub fn reading(&mut self, shard: &str, behind: Arc<MillisBehind>) {
        self.behind.insert(shard.to_string(), behind);
    }

    /// Whether an ask for the shard is to be acted on now: it is being read (not still
    /// having its state brought here) and not being handed over already (a pass reports
    /// an ask until the hand-over is written).
    pub fn can_hand_over(&self, shard: &str) -> bool {
        self.behind.contains_key(shard) && !self.releasing.contains(shard)
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
        let (hand_over, ended) = (self.hand_over.clone(), self.ended.clone());
        let listing = self.listing.take();
        let lags: BTreeMap<String, u64> = self
            .behind
            .iter()
            .filter_map(|(shard, b)| Some((shard.clone(), b.millis_behind()?)))
            .collect();
        let (skip, duration) = (self.at_latest && self.fresh, self.duration);
        self.under_way = Some(tokio::task::spawn_blocking(move || {
            let now = Instant::now().into_std();
            let locked = table.locked(duration / 3, |t| {
                pass(
                    t,
                    &mut observed,
                    &Pass {
                        me: &me,
                        held: &held,
                        hand_over: &hand_over,
                        ended: &ended,
                        lags: &lags,
                        listing: listing.as_deref(),
                        skip_closed_when_new: skip,
                        duration,
                        now,
                    },
                )
            });
            let (decisions, written) = match locked {
                Ok(decisions) => (decisions, [hand_over, ended].concat()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Nothing renewed or taken this time.
                    tracing::warn!(error = %e, "kinesis: lease pass skipped");
                    (Decisions::default(), Vec::new())
                }
                Err(e) => return Err(Error::io(table.dir(), e)),
            };
            Ok(Passed {
                observed,
                decisions,
                written,
            })
        }));
    }

    /// Brings the stage state of taken shards here, in a task of its own so that passes
    /// (renewals) never wait for it: the previous owner's last checkpoint holds it, or this
    /// member's own store does, and a shard resumes exactly where its state is.
    fn start_taking(&mut self) {
        if self.taking.is_some() || self.to_take.is_empty() {
            return;
        }
        let taken = std::mem::take(&mut self.to_take);
        let handoff = self.handoff.clone();
        let prefix = self.prefix.clone();
        self.taking = Some(tokio::task::spawn_blocking(move || {
            let mut at = BTreeMap::new();
            if let Some(handoff) = &handoff {
                let names: Vec<String> = taken
                    .iter()
                    .map(|t| format!("{prefix}{}", t.shard))
                    .collect();
                at = handoff.take_over(&names)?;
                for name in names {
                    if !at.contains_key(&name)
                        && let Some(own) = handoff.own(&name)?
                    {
                        at.insert(name, own);
                    }
                }
            }
            Ok(TakenShards {
                taken,
                at,
                stateful: handoff.is_some(),
            })
        }));
    }

    /// The next pass done, or shards' state taken over (hand-overs drained meanwhile are
    /// booked for the next pass).
    ///
    /// # Cancel safety
    /// Cancel safe: passes and take-overs run in tasks kept across calls.
    pub async fn next(&mut self) -> Result<Wait> {
        loop {
            self.start_pass();
            self.start_taking();
            let (under_way, taking) = (self.under_way.is_some(), self.taking.is_some());
            let (pass_task, take_task) = (&mut self.under_way, &mut self.taking);
            let passed = std::future::poll_fn(|cx| match pass_task {
                Some(t) => std::pin::Pin::new(t).poll(cx),
                None => std::task::Poll::Pending,
            });
            let took = std::future::poll_fn(|cx| match take_task {
                Some(t) => std::pin::Pin::new(t).poll(cx),
                None => std::task::Poll::Pending,
            });
            tokio::select! {
                Some((shard, drained)) = self.handing.next(), if !self.handing.is_empty() => {
                    // Not drained: the pipeline is stopping; the lease goes with the
                    // others when the source is dropped.
                    if drained {
                        self.hand_over.push(shard);
                        self.next_pass = Instant::now();
                    }
                }
                done = passed, if under_way => {
                    self.under_way = None;
                    self.next_pass = Instant::now() + self.duration / 3;
                    let passed = done.map_err(|e| Error::task("Kinesis lease pass", e))??;
                    return Ok(Wait::Passed(Box::new(self.book(passed))));
                }
                done = took, if taking => {
                    self.taking = None;
                    let taken = done.map_err(|e| Error::task("Kinesis shard take-over", e))??;
                    // Lost again meanwhile: not to be read.
                    let taken = TakenShards {
                        taken: taken
                            .taken
                            .into_iter()
                            .filter(|t| self.held.contains(&t.shard))
                            .collect(),
                        ..taken
                    };
                    return Ok(Wait::Taken(Box::new(taken)));
                }
                _ = tokio::time::sleep_until(self.next_pass), if !under_way => {}
            }
        }
    }

    /// Books what a pass decided: shards handed over, ended or lost leave `held`, taken
    /// ones join it and have their state brought here next.
    fn book(&mut self, mut passed: Passed) -> Passed {
        let written = std::mem::take(&mut passed.written);
        self.hand_over.retain(|s| !written.contains(s));
        self.ended.retain(|s| !written.contains(s));
        for shard in written.iter().chain(&passed.decisions.lost) {
            self.held.remove(shard);
            self.behind.remove(shard);
            self.releasing.remove(shard);
            self.to_take.retain(|t| &t.shard != shard);
        }
        self.held
            .extend(passed.decisions.taken.iter().map(|t| t.shard.clone()));
        self.to_take.append(&mut passed.decisions.taken);
        self.observed = Some(std::mem::take(&mut passed.observed));
        passed
    }
}

impl Drop for Membership {
    /// Lets the leases go at a clean stop (after the engine's last checkpoint: the source
    /// is dropped last), so other members take them at once instead of after they expire.
    fn drop(&mut self) {
        let me = self.me.clone();
        let released = self.table.locked(self.duration / 3, |t| {
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

/// Where a taken shard resumes. With stage state: exactly where the state is (taken over
/// from its last owner's checkpoint, or this member's own store now), so no record is
/// counted twice or missing from it; a lease's checkpoint further on (a store lost since)
/// only costs reading again. Without: the newest of the lease's checkpoint and this
/// member's start-up checkpoint (offsets only grow from owner to owner).
pub fn resume_of(
    taken: &Taken,
    shards: &TakenShards,
    own: &Checkpoint,
    partition: &str,
) -> Option<ResumeAt> {
    if shards.stateful {
        return shards.at.get(partition).cloned();
    }
    [own.resume_at(partition), taken.checkpoint.clone()]
        .into_iter()
        .flatten()
        .max_by_key(|at| at.offset)
}

struct LeaseCommits {
    table: Arc<LeaseTable>,
    me: Arc<str>,
    prefix: Arc<str>,
}

impl CommitHook for LeaseCommits {
    fn committed(&self, checkpoint: &Checkpoint) {
        let updates: Vec<(&str, ResumeAt)> = checkpoint
            .offsets
            .keys()
            .filter_map(|name| {
                let shard = name.strip_prefix(self.prefix.as_ref())?;
                Some((shard, checkpoint.resume_at(name)?))
            })
            .collect();
        if updates.is_empty() {
            return;
        }
        // Bounded: this runs inside the checkpoint's commit. A write skipped leaves the
        // lease an older checkpoint; this member's store has the newer one.
        let written = self.table.locked(Duration::from_secs(1), |t| {
            for (shard, at) in updates {
                if let Some(lease) = t.get_mut(shard)
                    && lease.owner.as_deref() == Some(&self.me)
                {
                    // A checkpoint without a position keeps the last one (it says which
                    // offset it stands for; the records up to the new offset are skipped).
                    let kept = lease.checkpoint.take().and_then(|c| c.position);
                    lease.checkpoint = Some(ResumeAt {
                        position: at.position.or(kept),
                        ..at
                    });
                }
            }
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "kinesis: writing checkpoints into the leases failed");
        }
    }
}

/// The lag of a stream's shards in time as the worker processes write it into their
/// leases: what `sluice run --processes auto` sizes the processes by (a Kinesis stream has
/// no consumer group whose lag a broker could report).
pub struct LeaseLag {
    table: LeaseTable,
}

impl LeaseLag {
    /// The lag of `config`'s stream, from the leases under `dir` (the checkpoint directory).
    pub fn new(dir: &std::path::Path, config: &super::KinesisSourceConfig) -> Result<LeaseLag> {
        let table = LeaseTable::open(dir, config.stream_ref().name())
            .map_err(|e| Error::io(dir.join("leases"), e))?;
        Ok(LeaseLag { table })
    }

    /// The sum of the shards' milliseconds behind the tip, and how many shards there are
    /// to read. Blocking (reads the lease files).
    pub fn read(&self) -> Result<(u64, usize)> {
        let table = self
            .table
            .read()
            .map_err(|e| Error::io(self.table.dir(), e))?;
        Ok(super::lease::lag(&table))
    }
}
