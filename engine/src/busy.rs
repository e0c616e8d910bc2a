//! Where a running pipeline's time goes: CPU time per stage, and each task kind's time
//! split into busy, back-pressured (blocked handing its output on) and idle.
//!
//! - **CPU**: the thread CPU clock (`CLOCK_THREAD_CPUTIME_ID`) read around every poll of
//!   a stage's call ([`metered`]): a tokio task moves between threads only between polls,
//!   so the sum is the CPU the call used, not wall time spent waiting for a remote answer.
//!   Work a call hands to other threads (none of the built-in stages does; DataFusion runs
//!   with one target partition, in the polling task) is not counted.
//! - **Busy, back-pressured, idle** (as Flink's busyTimeMsPerSecond and
//!   backPressuredTimeMsPerSecond): a worker runs a batch through every stage in turn and
//!   then hands its rows to the sink task. A stage is busy while its call runs; it is
//!   back-pressured while the rows it produced wait for the stages they reach (those that
//!   read them, directly or through others; not sibling branches) and for the
//!   sink task to take them (as it would be, were each stage a task of its own with no
//!   buffer between them); idle otherwise. The fractions are of the workers' time
//!   ([`TaskTime`]: the workers alive, integrated over time), so a stage at 0.9 busy is
//!   what holds the pipeline back, and the stages before it show back-pressure.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The calling thread's CPU time, in nanoseconds.
pub fn thread_cpu_nanos() -> u64 {
    clock_nanos(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The process's CPU time (user and system, every thread), in nanoseconds.
pub fn process_cpu_nanos() -> u64 {
    clock_nanos(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// `clock`'s reading in nanoseconds (0 if the clock cannot be read).
fn clock_nanos(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    match unsafe { libc::clock_gettime(clock, &mut t) } {
        0 => t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64,
        _ => 0,
    }
}

/// Runs `f`, adding the CPU time of each of its polls to `cpu`.
pub async fn metered<F: Future>(cpu: &AtomicU64, f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        let t0 = thread_cpu_nanos();
        let polled = f.as_mut().poll(cx);
        cpu.fetch_add(thread_cpu_nanos().saturating_sub(t0), Ordering::Relaxed);
        polled
    })
    .await
}

/// The time tasks of one kind (workers, partition readers, sink tasks) have been alive,
/// summed: the denominator of their busy and back-pressured fractions. Exact: the sum is
/// brought up to date whenever a task starts or stops, and when read.
#[derive(Debug)]
pub struct TaskTime {
    alive: AtomicU64,
    /// Nanoseconds of task time up to `since`.
    total: AtomicU64,
    since: Mutex<Instant>,
}

impl Default for TaskTime {
    fn default() -> Self {
        TaskTime {
            alive: AtomicU64::new(0),
            total: AtomicU64::new(0),
            since: Mutex::new(Instant::now()),
        }
    }
}

impl TaskTime {
    /// A task started; it counts until the guard is dropped.
    pub fn enter(&self) -> Alive<'_> {
        self.catch_up();
        self.alive.fetch_add(1, Ordering::Relaxed);
        Alive(self)
    }

    /// Task time so far, in nanoseconds.
    pub fn nanos(&self) -> u64 {
        self.catch_up();
        self.total.load(Ordering::Relaxed)
    }

    /// Tasks alive now.
    pub fn alive(&self) -> u64 {
        self.alive.load(Ordering::Relaxed)
    }

    fn catch_up(&self) {
        let mut since = self.since.lock().expect("task time lock");
        let now = Instant::now();
        let elapsed = now.duration_since(*since).as_nanos() as u64;
        self.total.fetch_add(
            elapsed.saturating_mul(self.alive.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        *since = now;
    }
}

/// A task of a [`TaskTime`], counted while this lives.
pub struct Alive<'a>(&'a TaskTime);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.catch_up();
        self.0.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Busy, back-pressured and idle as fractions of `task_nanos`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    pub busy: f64,
    pub back_pressured: f64,
    pub idle: f64,
}

impl Split {
    pub fn of(busy: u64, back_pressured: u64, task_nanos: u64) -> Split {
        if task_nanos == 0 {
            return Split {
                busy: 0.0,
                back_pressured: 0.0,
                idle: 1.0,
            };
        }
        let busy = (busy as f64 / task_nanos as f64).min(1.0);
        let back_pressured = (back_pressured as f64 / task_nanos as f64).min(1.0 - busy);
        Split {
            busy,
            back_pressured,
            idle: 1.0 - busy - back_pressured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_counted_per_poll_and_waiting_is_not() {
        let cpu = AtomicU64::new(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(metered(&cpu, async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let t0 = thread_cpu_nanos();
            let mut x = 0u64;
            while thread_cpu_nanos() - t0 < 100_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }));
        let ms = cpu.load(Ordering::Relaxed) as f64 / 1e6;
        // 100 ms of CPU spinning, none of the 200 ms asleep.
        assert!((100.0..180.0).contains(&ms), "{ms} ms");
    }

    #[test]
    fn task_time_sums_the_tasks_alive() {
        let time = TaskTime::default();
        let a = time.enter();
        let b = time.enter();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(a);
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(b);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Two tasks for 50 ms, then one for 50 ms (sleeps may run long on a busy machine).
        let ms = time.nanos() as f64 / 1e6;
        assert!((150.0..1000.0).contains(&ms), "{ms} ms");
        assert_eq!(time.alive(), 0);
    }

    #[test]
    fn splits_add_up_to_one() {
        let s = Split::of(80, 30, 100);
        assert_eq!(s.busy, 0.8);
        assert!((s.back_pressured - 0.2).abs() < 1e-9);
        assert!(s.idle.abs() < 1e-9);
        assert_eq!(Split::of(0, 0, 0).idle, 1.0);
    }
}
