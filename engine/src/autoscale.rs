//! The autoscaler: how many workers a pipeline should have, from its partitions' lag.
//!
//! The formula is KEDA's for Kafka consumers, with the engine's own bound:
//!
//! ```text
//! desired = clamp(ceil(total lag / lag_threshold), min_workers, min(max_workers, partitions × parallelization_factor))
//! ```
//!
//! - **Up** at once: the first evaluation whose lag asks for more workers gets them.
//! - **Down** only to the highest number asked for during the last `scale_down_cooldown`
//!   (Kubernetes' stabilization window): a backlog that drains for a moment and comes back
//!   does not remove and re-add workers, and the count never falls while lag is still above
//!   what the remaining workers are meant to carry. Scale-downs are a whole cooldown apart
//!   (as a scale-down policy's period in Kubernetes): each one moves partitions (a consumer
//!   group rebalance, state handed over), and the next waits until that has settled rather
//!   than landing in the middle of it.
//!
//! The same [`Autoscaler`] drives worker tasks inside a process (the executor) and worker
//! processes (`sluice run --processes auto`); it only decides, and says why.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What one worker is meant to carry of the partitions' lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagThreshold {
    /// Records written and not yet checkpointed, summed over partitions (Kafka's consumer
    /// lag, a generator's records due).
    Records(u64),
    /// Time behind the stream's tip, summed over partitions: where a source measures lag
    /// in time (Kinesis's `MillisBehindLatest`, what Lambda calls the iterator age).
    Time(Duration),
}

impl LagThreshold {
    /// The threshold in the lag's unit: records, or milliseconds.
    pub fn units(self) -> u64 {
        match self {
            LagThreshold::Records(n) => n,
            LagThreshold::Time(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// A lag in this threshold's unit, as a person reads it.
    pub fn show(self, lag: u64) -> String {
        match self {
            LagThreshold::Records(_) => lag.to_string(),
            LagThreshold::Time(_) => humantime(Duration::from_millis(lag)),
        }
    }
}

impl std::fmt::Display for LagThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LagThreshold::Records(n) => write!(f, "{n}"),
            LagThreshold::Time(d) => f.write_str(&humantime(*d)),
        }
    }
}

/// The `scaling:` section of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingPolicy {
    pub min_workers: usize,
    pub max_workers: usize,
    /// The lag one worker is meant to carry.
    pub lag_threshold: LagThreshold,
    /// How long the lag must have asked for fewer workers before they go.
    pub scale_down_cooldown: Duration,
    /// Batches of one partition processed at once (1–10), keys kept in order.
    pub parallelization_factor: usize,
    /// The column whose value keeps records in order under a parallelization factor
    /// (default `_key`, the record's key).
    pub key: Option<std::sync::Arc<str>>,
    /// Time between evaluations.
    pub interval: Duration,
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        ScalingPolicy {
            min_workers: 1,
            max_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            lag_threshold: LagThreshold::Records(10_000),
            scale_down_cooldown: Duration::from_secs(60),
            parallelization_factor: 1,
            key: None,
            interval: Duration::from_secs(1),
        }
    }
}

impl ScalingPolicy {
    /// The defaults for a source whose lag is in time (`in_time`: a worker per 30 s behind
    /// the stream's tip) or in records (a worker per 10,000).
    pub fn for_lag(in_time: bool) -> ScalingPolicy {
        ScalingPolicy {
            lag_threshold: if in_time {
                LagThreshold::Time(Duration::from_secs(30))
            } else {
                LagThreshold::Records(10_000)
            },
            ..ScalingPolicy::default()
        }
    }

    /// The most workers `partitions` can keep busy under this policy.
    pub fn cap(&self, partitions: usize) -> usize {
        let useful = partitions.saturating_mul(self.parallelization_factor);
        self.max_workers.min(useful).max(self.min_workers)
    }

    /// The workers a lag (in the threshold's unit) asks for, before any hysteresis.
    pub fn target(&self, lag: u64, partitions: usize) -> usize {
        let wanted = lag.div_ceil(self.lag_threshold.units().max(1));
        let wanted = usize::try_from(wanted).unwrap_or(usize::MAX);
        wanted.clamp(self.min_workers, self.cap(partitions))
    }
}

/// A change of the worker count, with its reason (for the log and the metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub from: usize,
    pub to: usize,
    pub reason: String,
}

impl Decision {
    pub fn direction(&self) -> &'static str {
        if self.to > self.from { "up" } else { "down" }
    }
}

/// Decides the worker count from observations of lag over time.
#[derive(Debug)]
pub struct Autoscaler {
    policy: ScalingPolicy,
    desired: usize,
    /// Targets of the last cooldown, oldest first.
    recent: VecDeque<(Instant, usize)>,
    /// The first observation, or the last scale-down: no scaling down before a whole
    /// cooldown was observed since.
    first: Option<Instant>,
    /// At most this many fewer per scale-down (`None`: down to what the window needs).
    step_down: Option<usize>,
    /// The next observation is of a group still moving partitions ([`Self::unsettled`]).
    unsettled: bool,
    /// Since when a scale-down due has waited for the group to settle.
    waiting: Option<Instant>,
}

/// How long a scale-down due waits for the group to settle at most: a group that never
/// does (a member that keeps failing, a partition no worker of this supervisor can read)
/// must not keep every worker for good.
pub const SETTLE_WAIT: Duration = Duration::from_secs(60);

impl Autoscaler {
    /// Starts at `min_workers`.
    pub fn new(policy: ScalingPolicy) -> Self {
        Autoscaler {
            desired: policy.min_workers.max(1),
            policy,
            recent: VecDeque::new(),
            first: None,
            step_down: None,
            unsettled: false,
            waiting: None,
        }
    }

    /// Scales down one at a time (a cooldown apart): for worker processes of a consumer
    /// group, where each one that leaves is a rebalance and a hand-over of state.
    pub fn one_step_down(mut self) -> Self {
        self.step_down = Some(1);
        self
    }

    pub fn policy(&self) -> &ScalingPolicy {
        &self.policy
    }

    /// A scale-down has not taken effect yet at `now` (a worker process is still leaving
    /// the group): the next one waits a whole `scale_down_cooldown` from here. A broker
    /// rebalancing after one member left may lose the group if the next leaves meanwhile
    /// (tansu did, with two members leaving 1.5 s apart); scale-ups are not held.
    pub fn hold_scale_down(&mut self, now: Instant) {
        self.first = Some(now);
    }

    /// At the next observation the group is still moving partitions (a partition without
    /// an owner, a new member without a partition): a scale-down due then waits, for at
    /// most [`SETTLE_WAIT`], and comes at the first observation after it has settled. A
    /// member that leaves in the middle of a rebalance starts it over (and tansu lost
    /// partitions for good that way).
    pub fn unsettled(&mut self) {
        self.unsettled = true;
    }

    pub fn desired(&self) -> usize {
        self.desired
    }

    /// Takes one observation: the total lag and the partitions now assigned. Returns the
    /// change it decides, if any.
    pub fn observe(&mut self, now: Instant, lag: u64, partitions: usize) -> Option<Decision> {
        let target = self.policy.target(lag, partitions.max(1));
        let cooldown = self.policy.scale_down_cooldown;
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > cooldown)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, target));
        let threshold = self.policy.lag_threshold;
        let from = self.desired;
        if target > from {
            self.desired = target;
            let bound = if target == self.policy.cap(partitions.max(1))
                && lag.div_ceil(threshold.units().max(1)) > target as u64
            {
                format!(
                    " (capped: max_workers {}, {partitions} partitions × parallelization_factor {})",
                    self.policy.max_workers, self.policy.parallelization_factor
                )
            } else {
                String::new()
            };
            return Some(Decision {
                from,
                to: target,
                reason: format!(
                    "lag {} over {from} worker(s) at lag_threshold {threshold} asks for {target}{bound}",
                    threshold.show(lag)
                ),
            });
        }
        // Down only to the most any observation of the cooldown asked for: a count that
        // was needed within the window stays.
        let held = self.recent.iter().map(|(_, t)| *t).max().unwrap_or(target);
        let window_full = now.duration_since(*self.first.get_or_insert(now)) >= cooldown;
        let unsettled = std::mem::take(&mut self.unsettled);
        if held < from && window_full {
            let waited = now.duration_since(*self.waiting.get_or_insert(now));
            if unsettled && waited < SETTLE_WAIT {
                return None;
            }
            self.waiting = None;
            let to = self
                .step_down
                .map_or(held, |k| held.max(from.saturating_sub(k)));
            self.desired = to;
            self.first = Some(now);
            let settle = if unsettled {
                format!(
                    "; the group has not settled in {} (moving partitions)",
                    humantime(waited)
                )
            } else {
                String::new()
            };
            return Some(Decision {
                from,
                to,
                reason: format!(
                    "lag {} has asked for at most {held} worker(s) for {} (scale_down_cooldown){settle}",
                    self.policy.lag_threshold.show(lag),
                    humantime(cooldown)
                ),
            });
        }
        self.waiting = None;
        None
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ScalingPolicy {
        ScalingPolicy {
            min_workers: 1,
            max_workers: 8,
            lag_threshold: LagThreshold::Records(1000),
            scale_down_cooldown: Duration::from_secs(10),
            parallelization_factor: 1,
            key: None,
            interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_target_is_kedas_formula_clamped_by_partitions() {
        let p = policy();
        assert_eq!(p.target(0, 8), 1);
        assert_eq!(p.target(1, 8), 1);
        assert_eq!(p.target(1000, 8), 1);
        assert_eq!(p.target(1001, 8), 2);
        assert_eq!(p.target(5500, 8), 6);
        assert_eq!(p.target(1_000_000, 8), 8, "max_workers");
        assert_eq!(p.target(1_000_000, 3), 3, "no more workers than partitions");
        let p4 = ScalingPolicy {
            parallelization_factor: 4,
            max_workers: 100,
            ..policy()
        };
        assert_eq!(
            p4.target(1_000_000, 3),
            12,
            "partitions × parallelization_factor"
        );
        let min3 = ScalingPolicy {
            min_workers: 3,
            ..policy()
        };
        assert_eq!(
            min3.target(0, 1),
            3,
            "min_workers wins over the partition bound"
        );
    }

    #[test]
    fn scales_up_at_once_and_down_after_the_cooldown() {
        let mut a = Autoscaler::new(policy());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(a.observe(at(0), 0, 8), None);
        let up = a.observe(at(1), 4500, 8).unwrap();
        assert_eq!((up.from, up.to, up.direction()), (1, 5, "up"));
        assert!(up.reason.contains("lag 4500"), "{}", up.reason);
        let up = a.observe(at(2), 100_000, 8).unwrap();
        assert_eq!(up.to, 8);
        assert!(up.reason.contains("capped"), "{}", up.reason);
        // The backlog drains: nothing changes until 10s after the last high observation.
        for s in 3..12 {
            assert_eq!(a.observe(at(s), 0, 8), None, "at {s}s");
        }
        let down = a.observe(at(13), 0, 8).unwrap();
        assert_eq!((down.from, down.to, down.direction()), (8, 1, "down"));
        assert!(down.reason.contains("10s"), "{}", down.reason);
        assert_eq!(a.desired(), 1);
    }

    #[test]
    fn a_scale_down_waits_for_the_group_to_settle_but_not_for_ever() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut a = Autoscaler::new(policy());
        a.observe(at(0), 4500, 8).unwrap();
        // Due at 11s; the group settles at 20s: down at the first observation after.
        for s in 1..20 {
            a.unsettled();
            assert_eq!(a.observe(at(s), 0, 8), None, "at {s}s");
        }
        let down = a.observe(at(20), 0, 8).unwrap();
        assert_eq!((down.from, down.to), (5, 1));
        assert!(!down.reason.contains("settled"), "{}", down.reason);
        // A group that never settles: down SETTLE_WAIT after it was due.
        let mut a = Autoscaler::new(policy());
        a.observe(at(0), 4500, 8).unwrap();
        let mut down = None;
        for s in 1..200 {
            a.unsettled();
            if let Some(d) = a.observe(at(s), 0, 8) {
                down = Some((s, d));
                break;
            }
        }
        let (s, d) = down.expect("a scale-down");
        assert_eq!(s, 11 + SETTLE_WAIT.as_secs(), "{}", d.reason);
        assert!(d.reason.contains("has not settled in 60s"), "{}", d.reason);
        // Settling that is not needed (no scale-down due) waits for nothing.
        let mut a = Autoscaler::new(policy());
        a.unsettled();
        assert_eq!(a.observe(at(0), 0, 8), None);
        a.observe(at(1), 4500, 8).unwrap();
        for s in 2..11 {
            assert_eq!(a.observe(at(s), 0, 8), None);
        }
        assert!(a.observe(at(12), 0, 8).is_some());
    }

    #[test]
    fn a_backlog_that_comes_and_goes_does_not_flap() {
        let mut a = Autoscaler::new(policy());
        let t0 = Instant::now();
        let mut changes = Vec::new();
        // Lag alternates between a full load for 4 workers and nothing, every 3 seconds.
        for s in 0..60 {
            let lag = if (s / 3) % 2 == 0 { 4000 } else { 0 };
            if let Some(d) = a.observe(t0 + Duration::from_secs(s), lag, 8) {
                changes.push((s, d.to));
            }
        }
        assert_eq!(
            changes,
            vec![(0, 4)],
            "one move up, none down while the lag keeps coming back"
        );
    }

    #[test]
    fn scales_down_step_by_step_to_what_the_window_still_needs() {
        let mut a = Autoscaler::new(policy());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        a.observe(at(0), 8000, 8);
        assert_eq!(a.desired(), 8);
        // Half the lag for a while: down to 4 once the cooldown passed since the 8.
        let mut seen = Vec::new();
        for s in 1..30 {
            if let Some(d) = a.observe(at(s), 3500, 8) {
                seen.push((s, d.to));
            }
        }
        assert_eq!(seen, vec![(11, 4)]);
    }

    #[test]
    fn scale_downs_are_a_cooldown_apart() {
        let mut a = Autoscaler::new(policy());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        a.observe(at(0), 8000, 8);
        a.observe(at(500), 3500, 8);
        // Asks for 4 once and for 1 from then on: down to 4 when the 8 leaves the window,
        // and to 1 only a whole cooldown later, not at the next observation.
        let mut seen = Vec::new();
        for i in 2..80 {
            if let Some(d) = a.observe(at(500 * i), 0, 8) {
                seen.push((500 * i, d.to));
            }
        }
        assert_eq!(seen, vec![(10_500, 4), (20_500, 1)]);
    }

    #[test]
    fn one_step_down_leaves_one_at_a_time() {
        let mut a = Autoscaler::new(policy()).one_step_down();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        a.observe(at(0), 3000, 8);
        assert_eq!(a.desired(), 3);
        let mut seen = Vec::new();
        for i in 1..80 {
            if let Some(d) = a.observe(at(500 * i), 0, 8) {
                seen.push((500 * i, d.to));
            }
        }
        assert_eq!(seen, vec![(10_500, 2), (20_500, 1)]);
    }

    #[test]
    fn a_scale_down_still_under_way_holds_the_next_one() {
        let mut a = Autoscaler::new(policy()).one_step_down();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        a.observe(at(0), 3000, 8);
        let mut seen = Vec::new();
        for i in 1..80 {
            // The first scale-down's worker is still leaving at 11 s to 16.5 s.
            if (11_000..=16_500).contains(&(500 * i)) {
                a.hold_scale_down(at(500 * i));
            }
            if let Some(d) = a.observe(at(500 * i), 0, 8) {
                seen.push((500 * i, d.to));
            }
        }
        // The next one a whole cooldown after the first worker has left, not after the
        // first decision (20.5 s).
        assert_eq!(seen, vec![(10_500, 2), (26_500, 1)]);
        // Scale-ups are not held.
        a.hold_scale_down(at(40_000));
        assert_eq!(a.observe(at(40_500), 5000, 8).map(|d| d.to), Some(5));
    }

    #[test]
    fn scales_down_when_observations_do_not_fall_on_the_cooldowns_edge() {
        let mut a = Autoscaler::new(policy());
        let t0 = Instant::now();
        let mut down = None;
        for i in 0..100u64 {
            let at = t0 + Duration::from_millis(503 * i);
            let lag = if i < 4 { 100_000 } else { 0 };
            if let Some(d) = a.observe(at, lag, 8)
                && d.to < d.from
            {
                down = Some(at.duration_since(t0));
                break;
            }
        }
        // The last high observation was at 1.509s: down 10s (the cooldown) after it.
        let down = down.expect("never scaled down");
        assert!(
            down > Duration::from_millis(11_509) && down < Duration::from_millis(12_100),
            "{down:?}"
        );
    }

    #[test]
    fn a_threshold_in_time_asks_a_worker_per_so_much_time_behind() {
        let p = ScalingPolicy {
            lag_threshold: LagThreshold::Time(Duration::from_secs(10)),
            ..policy()
        };
        assert_eq!(p.target(0, 8), 1);
        assert_eq!(p.target(10_000, 8), 1);
        assert_eq!(p.target(45_000, 8), 5);
        let mut a = Autoscaler::new(p);
        let up = a.observe(Instant::now(), 45_000, 8).unwrap();
        assert_eq!(up.to, 5);
        assert_eq!(
            up.reason,
            "lag 45s over 1 worker(s) at lag_threshold 10s asks for 5"
        );
    }
}
