//! Rate limiting for sources that make their records (generator, nexmark).

use std::time::Duration;

use tokio::time::Instant;

/// Paces a rate-limited partition: record `first_offset + i` is due at `started + i / rate`.
pub(crate) struct Pace {
    rate: f64,
    started: Instant,
    first_offset: i64,
}

impl Pace {
    pub(crate) fn new(rate: f64, first_offset: i64) -> Self {
        Pace {
            rate,
            started: Instant::now(),
            first_offset,
        }
    }

    /// Records due by now when `next_offset` is the next to make (at most `max`), waiting
    /// until at least one is.
    pub(crate) async fn due(&self, next_offset: i64, max: u64) -> u64 {
        loop {
            let elapsed = self.started.elapsed().as_secs_f64();
            let produced = next_offset - self.first_offset;
            let due = (elapsed * self.rate) as i64 + 1 - produced;
            if due > 0 {
                return (due as u64).min(max);
            }
            let next_due = produced as f64 / self.rate;
            let wait = Duration::from_secs_f64((next_due - elapsed).max(0.0005));
            tokio::time::sleep(wait).await;
        }
    }

    /// Records due but not made yet (at most `remaining`).
    pub(crate) fn backlog(&self, next_offset: i64, remaining: Option<u64>) -> u64 {
        let due = (self.started.elapsed().as_secs_f64() * self.rate) as i64
            - (next_offset - self.first_offset);
        let due = due.max(0) as u64;
        remaining.map_or(due, |r| due.min(r))
    }
}
