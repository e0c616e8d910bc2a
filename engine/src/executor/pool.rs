//! The worker pool: worker tasks started and retired as the autoscaler decides, the
//! partitions' lanes spread over them, and the checkpoint barrier's list of workers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::messages::{Route, SinkMsg, WorkerMsg};
use super::supervisor::PartitionHandle;
use super::worker;
use crate::Result;
use crate::graph::Graph;
use crate::stage::PlannedStage;
use crate::stats::RunStats;

/// The worker tasks: started and retired as the autoscaler decides, each fed by its own
/// channel. Workers are numbered in the order they start; a retired one finishes what it
/// was sent and ends once no reader routes to it any more.
pub(super) struct Pool {
    /// The stages every worker makes its instances of, and what each reads.
    plan: Arc<(Vec<PlannedStage>, Graph)>,
    pipeline: Arc<str>,
    dead_letters: bool,
    stats: Arc<RunStats>,
    /// Dropped when the pool closes, so that the sink task ends after the last worker.
    sink: Option<mpsc::Sender<SinkMsg>>,
    failed: Arc<AtomicBool>,
    capacity: usize,
    pub(super) tasks: JoinSet<Result<usize>>,
    /// Workers taking partitions: their channel and how many partitions they serve.
    pub(super) live: BTreeMap<usize, (mpsc::Sender<WorkerMsg>, usize)>,
    next_id: usize,
    pub(super) peak: usize,
    /// Every worker's channel, for checkpoint barriers, and whether one is out.
    pub(super) barrier: Arc<Barrier>,
    /// Workers wanted while a barrier was out: started once it is released.
    pub(super) wanted: Option<usize>,
}

/// The workers a stateful checkpoint's barrier goes to (retired ones drop out once ended),
/// and whether one is out. While it is, no worker starts: one started after the barrier
/// went out would not be paused, and could change state while it is snapshotted (rows past
/// the offsets the checkpoint commits, windows emitted and missing from it). Scaling up
/// waits for the release; moves between workers need not (every one of them is paused).
#[derive(Default)]
pub(super) struct Barrier {
    targets: std::sync::Mutex<BarrierTargets>,
    pub(super) released: tokio::sync::Notify,
}

#[derive(Default)]
struct BarrierTargets {
    /// Each worker's channel, and a receiver that closes when its task has ended.
    workers: Vec<(mpsc::WeakSender<WorkerMsg>, watch::Receiver<()>)>,
    out: bool,
}

/// A worker a barrier must stop: one that takes messages is paused; one retired, whose
/// channel is closed while it still works through what was queued, is waited for.
pub(super) enum Target {
    Live(mpsc::Sender<WorkerMsg>, watch::Receiver<()>),
    Draining(watch::Receiver<()>),
}

impl Barrier {
    /// Marks a barrier out; the workers it must stop.
    pub(super) fn send_out(&self) -> Vec<Target> {
        let mut targets = self.targets.lock().expect("barrier lock");
        targets.out = true;
        targets
            .workers
            .retain(|(_, ended)| ended.has_changed().is_ok());
        targets
            .workers
            .iter()
            .map(|(w, ended)| match w.upgrade() {
                Some(w) => Target::Live(w, ended.clone()),
                None => Target::Draining(ended.clone()),
            })
            .collect()
    }

    /// The workers go on: waiting scale-ups may start theirs.
    pub(super) fn release(&self) {
        self.targets.lock().expect("barrier lock").out = false;
        self.released.notify_one();
    }

    /// Registers a new worker's channel and end, unless a barrier is out (then `false`).
    fn join(&self, worker: &mpsc::Sender<WorkerMsg>, ended: watch::Receiver<()>) -> bool {
        let mut targets = self.targets.lock().expect("barrier lock");
        if targets.out {
            return false;
        }
        targets.workers.push((worker.downgrade(), ended));
        true
    }
}

impl Pool {
    /// A pool without workers yet; they send to `sink`.
    pub(super) fn new(
        stages: Vec<PlannedStage>,
        graph: Graph,
        pipeline: Arc<str>,
        dead_letters: bool,
        stats: Arc<RunStats>,
        sink: mpsc::Sender<SinkMsg>,
        capacity: usize,
    ) -> Self {
        Pool {
            plan: Arc::new((stages, graph)),
            pipeline,
            dead_letters,
            stats,
            sink: Some(sink),
            failed: Arc::default(),
            capacity,
            tasks: JoinSet::new(),
            live: BTreeMap::new(),
            next_id: 0,
            peak: 0,
            barrier: Arc::default(),
            wanted: None,
        }
    }

    /// Set when a worker stopped on an error (see `Checkpointing::worker_failed`).
    pub(super) fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// Starts a worker; its stages open in its task. `None` while a checkpoint's barrier
    /// is out (see [`Barrier`]).
    fn spawn(&mut self) -> Option<usize> {
        let (tx, mut rx) = mpsc::channel(self.capacity);
        // Dropped when the task ends: a barrier waits for a retired worker's end.
        let (running, ended) = watch::channel(());
        if !self.barrier.join(&tx, ended) {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(id, (tx, 0));
        self.peak = self.peak.max(self.live.len());
        let plan = self.plan.clone();
        let (name, stats) = (self.pipeline.clone(), self.stats.clone());
        let sink = self.sink.clone().expect("the pool is open");
        let (failed, dead_letters) = (self.failed.clone(), self.dead_letters);
        self.tasks.spawn(async move {
            let _running = running;
            let result =
                worker::worker_loop(id, name, &plan, dead_letters, &mut rx, sink, stats).await;
            if result.is_err() {
                // Before the channel (and any barrier in it) is dropped: the sink task must
                // not snapshot state that is ahead of what it received.
                failed.store(true, Ordering::Release);
            }
            result.map(|()| id)
        });
        Some(id)
    }

    /// The live worker with the fewest partitions (the oldest among equals).
    pub(super) fn least_loaded(&self) -> (usize, mpsc::Sender<WorkerMsg>) {
        let (id, (tx, _)) = self
            .live
            .iter()
            .min_by_key(|(id, (_, load))| (*load, **id))
            .expect("at least one worker");
        (*id, tx.clone())
    }

    pub(super) fn add_load(&mut self, worker: usize, delta: isize) {
        if let Some((_, load)) = self.live.get_mut(&worker) {
            *load = load.saturating_add_signed(delta);
        }
    }

    /// A partition's reader has ended: its lanes no longer load their workers.
    pub(super) fn release_lanes(&mut self, p: &PartitionHandle) {
        for lane in &p.lanes {
            self.add_load(lane.worker, -1);
        }
    }

    /// Routes a lane of the partition to `worker` from its next batch on (the reader hands
    /// it off: the old worker finishes the lane's batches first).
    pub(super) fn move_lane(&mut self, p: &mut PartitionHandle, lane: usize, worker: usize) {
        let Some((tx, _)) = self.live.get(&worker) else {
            return;
        };
        let from = p.lanes[lane].worker;
        if from == worker {
            return;
        }
        let tx = tx.clone();
        self.add_load(from, -1);
        self.add_load(worker, 1);
        tracing::debug!(partition = %p.info.name, lane, from, to = worker, "moving partition");
        p.lanes[lane].worker = worker;
        p.lanes[lane].route.send_replace(Route { worker, tx });
    }

    /// Starts or retires workers until `n` (at least one) take partitions, then spreads
    /// the partitions' lanes evenly over them. Workers that cannot start while a barrier is
    /// out start at its release ([`Pool::wanted`]).
    pub(super) fn scale_to(&mut self, n: usize, partitions: &mut HashMap<u32, PartitionHandle>) {
        let n = n.max(1);
        self.stats
            .workers_desired
            .store(n as u64, Ordering::Relaxed);
        self.wanted = None;
        while self.live.len() < n {
            if self.spawn().is_none() {
                self.wanted = Some(n);
                break;
            }
        }
        while self.live.len() > n {
            let (&retired, _) = self.live.last_key_value().expect("workers");
            self.live.remove(&retired);
            for p in partitions.values_mut() {
                for lane in 0..p.lanes.len() {
                    if p.lanes[lane].worker == retired {
                        let (to, _) = self.least_loaded();
                        self.move_lane(p, lane, to);
                    }
                }
            }
        }
        self.stats
            .workers
            .store(self.live.len() as u64, Ordering::Relaxed);
        // Even out: one partition at a time from the busiest worker to the idlest.
        loop {
            let busiest = self
                .live
                .iter()
                .max_by_key(|(id, (_, load))| (*load, std::cmp::Reverse(**id)));
            let (&from, &(_, most)) = busiest.expect("workers");
            let (to, _) = self.least_loaded();
            let fewest = self.live[&to].1;
            if most <= fewest + 1 {
                break;
            }
            let Some((p, lane)) = partitions.values_mut().find_map(|p| {
                let lane = p.lanes.iter().position(|l| l.worker == from)?;
                Some((p, lane))
            }) else {
                break;
            };
            self.move_lane(p, lane, to);
        }
    }

    /// Asks the least loaded worker to hand out what stateful stages have due (see
    /// [`WorkerMsg::Emit`]). A worker whose channel is full is busy: it hands out what is
    /// due after its next batch anyway.
    pub(super) fn emit_due(&self, partitions: &HashMap<u32, PartitionHandle>) {
        // Under a partition read here now: not one revoked and draining, whose provenance
        // the rows would take and whose state a later stage would add them to.
        let Some(p) = partitions
            .values()
            .find(|p| p.drained.is_none() && !p.stop.is_cancelled())
        else {
            return;
        };
        let (_, tx) = self.least_loaded();
        let _ = tx.try_send(WorkerMsg::Emit(p.info.clone()));
    }

    /// Stops taking work: the workers end once their channels are empty. Their tasks.
    pub(super) fn close(&mut self) -> JoinSet<Result<usize>> {
        self.live.clear();
        self.sink = None;
        std::mem::take(&mut self.tasks)
    }
}
