//! A circuit breaker per stage, shared by its instances on every worker.
//!
//! - **Closed**: calls go through. Each call's outcome is counted over a sliding `window`;
//!   once at least `min_calls` calls were made in it and the share of calls that failed
//!   transiently (timeouts, refused connections, 5xx: the outside system is in trouble) is
//!   `failure_ratio` or more, the breaker opens. Permanent failures (bad input) do not
//!   count: they say nothing about the system called.
//! - **Open** for `open_for`: no call is made; the stage's `fallback` applies to the rows.
//! - **Half-open**: up to `half_open_calls` trial calls go through; if they all succeed the
//!   breaker closes, the first one that fails opens it again.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::stats::{RunStats, StageStats};

/// `circuit_breaker:` of a stage.
#[derive(Debug, Clone)]
pub struct BreakerPolicy {
    pub failure_ratio: f64,
    pub min_calls: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub half_open_calls: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_ratio: 0.5,
            min_calls: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_calls: 3,
        }
    }
}

/// What happens to rows while the breaker is open.
#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    /// The rows become dead letters (error class transient, "circuit open").
    DeadLetter,
    /// The rows leave the pipeline here, counted as skipped.
    Skip,
    /// The rows go on with these values in the stage's output columns (as JSON values;
    /// columns not named are null). Columns of the input pass through.
    Default(serde_json::Map<String, serde_json::Value>),
    /// The worker waits until the breaker lets a call through: reading stops, lag grows,
    /// nothing is lost.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// The answer to "may I call?".
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    Call,
    /// Open: apply the fallback; a call may be tried again after the duration.
    Rejected(Duration),
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Closed: (when, failed) of recent calls.
    calls: VecDeque<(Instant, bool)>,
    opened_at: Instant,
    trials_started: u32,
    trials_passed: u32,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy,
            inner: Mutex::new(Inner {
                state: State::Closed,
                calls: VecDeque::new(),
                opened_at: Instant::now(),
                trials_started: 0,
                trials_passed: 0,
            }),
        }
    }

    pub fn state(&self) -> State {
        self.inner.lock().expect("breaker lock").state
    }

    pub fn permit(&self, stats: &StageStats) -> Permit {
        let mut b = self.inner.lock().expect("breaker lock");
        if b.state == State::Open {
            let waited = b.opened_at.elapsed();
            if waited < self.policy.open_for {
                return Permit::Rejected(self.policy.open_for - waited);
            }
            b.state = State::HalfOpen;
            b.trials_started = 0;
            b.trials_passed = 0;
            tracing::info!(stage = %stats.name, "circuit half-open: trying calls again");
        }
        if b.state == State::HalfOpen {
            if b.trials_started >= self.policy.half_open_calls {
                // Enough trials in flight: the others wait for their verdict.
                return Permit::Rejected(Duration::from_millis(50));
            }
            b.trials_started += 1;
        }
        Permit::Call
    }

    /// Records a call's outcome: `failed` when it failed transiently.
    pub fn record(&self, failed: bool, stats: &StageStats) {
        let mut b = self.inner.lock().expect("breaker lock");
        let now = Instant::now();
        match b.state {
            State::HalfOpen if failed => self.open(&mut b, stats, now),
            State::HalfOpen => {
                b.trials_passed += 1;
                if b.trials_passed >= self.policy.half_open_calls {
                    b.state = State::Closed;
                    b.calls.clear();
                    RunStats::add(&stats.breaker_closed, 1);
                    tracing::warn!(stage = %stats.name, "circuit closed: calls succeed again");
                }
            }
            State::Closed => {
                b.calls.push_back((now, failed));
                while b
                    .calls
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.policy.window)
                {
                    b.calls.pop_front();
                }
                let total = b.calls.len() as u32;
                let failures = b.calls.iter().filter(|(_, f)| *f).count() as f64;
                if total >= self.policy.min_calls
                    && failures / f64::from(total) >= self.policy.failure_ratio
                {
                    self.open(&mut b, stats, now);
                }
            }
            // A call that started before the breaker opened.
            State::Open => {}
        }
    }

    fn open(&self, b: &mut Inner, stats: &StageStats, now: Instant) {
        b.state = State::Open;
        b.opened_at = now;
        b.calls.clear();
        RunStats::add(&stats.breaker_opened, 1);
        tracing::warn!(
            stage = %stats.name,
            open_for = ?self.policy.open_for,
            "circuit open: calls fail too often; the fallback applies"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (Breaker, StageStats) {
        let policy = BreakerPolicy {
            failure_ratio: 0.5,
            min_calls: 4,
            window: Duration::from_secs(60),
            open_for: Duration::from_millis(30),
            half_open_calls: 2,
        };
        (Breaker::new(policy), StageStats::default())
    }

    #[test]
    fn opens_on_failures_and_closes_after_good_trials() {
        let (b, stats) = breaker();
        for failed in [false, true, false] {
            assert_eq!(b.permit(&stats), Permit::Call);
            b.record(failed, &stats);
        }
        assert_eq!(b.state(), State::Closed, "fewer than min_calls");
        b.record(true, &stats);
        assert_eq!(b.state(), State::Open, "2 of 4 failed");
        assert!(matches!(b.permit(&stats), Permit::Rejected(_)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.permit(&stats), Permit::Call);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.permit(&stats), Permit::Call);
        assert!(
            matches!(b.permit(&stats), Permit::Rejected(_)),
            "only two trials"
        );
        b.record(false, &stats);
        b.record(false, &stats);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(RunStats::get(&stats.breaker_opened), 1);
        assert_eq!(RunStats::get(&stats.breaker_closed), 1);
    }

    #[test]
    fn a_failed_trial_opens_again() {
        let (b, stats) = breaker();
        for _ in 0..4 {
            b.record(true, &stats);
        }
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.permit(&stats), Permit::Call);
        b.record(true, &stats);
        assert_eq!(b.state(), State::Open);
        assert_eq!(RunStats::get(&stats.breaker_opened), 2);
    }
}
